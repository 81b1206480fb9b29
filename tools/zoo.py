"""`kaffe zoo list | show NAME | fetch NAME`: kaffe's model zoo (models/<name>/ with a README.md front matter).

A model's README.md starts with a YAML front matter, as Caffe's model zoo readmes do:

    ---
    name: ...
    caffemodel: file name of the weights
    caffemodel_url: where to download them
    sha1: (or sha256:) checksum of the file
    ---

`fetch` downloads the weights into the cache (~/.cache/kaffe/models/<name>/, or $KAFFE_CACHE/<name>/), checking the
checksum (as Caffe's scripts/download_model_binary.py does) before the file takes its name there; model and file
names that would lead outside the cache (`..`, absolute paths) are refused.
"""
import argparse
import hashlib
import os
import socket
import sys
import urllib.error
import urllib.request

import yaml

from ..engine.errors import KaffeError
from .progress import Progress, add_quiet_flag, stream

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
CHUNK = 1 << 20
TIMEOUT_S = 30


def cache_dir():
    return os.environ.get("KAFFE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kaffe", "models")


def read_front_matter(path):
    """The YAML front matter of a README (the mapping between its leading `---` lines; every value read as a
    string, so that a checksum of digits stays as written) and the text after it."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines or lines[0].strip() != "---":
        return {}, "\n".join(lines)
    end = next((n for n, line in enumerate(lines[1:], start=1) if line.strip() == "---"), None)
    if end is None:
        raise KaffeError(f"{path}: the front matter opened by '---' on line 1 is never closed")
    try:
        fields = yaml.load("\n".join(lines[1:end]), Loader=yaml.BaseLoader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 2}" if mark is not None else path
        raise KaffeError(f"{where}: the front matter is not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
        raise KaffeError(f"{path}: the front matter must be `key: value` lines with one value each")
    return fields, "\n".join(lines[end + 1:]).strip()


def model_names():
    return sorted(d for d in os.listdir(MODELS)
                  if os.path.isdir(os.path.join(MODELS, d)) and not d.startswith(("_", ".")))


def _plain_name(value, what):
    """`value` as one path component: a name from the command line or a README never leads outside its folder."""
    if not value or value in (".", "..") or os.path.isabs(value) or "/" in value or "\\" in value or "\0" in value:
        raise KaffeError(f"refusing the {what} {value!r}: it must be a plain name (no '..', no absolute path, "
                         f"no '/')")
    return value


def model_info(name):
    folder = os.path.join(MODELS, _plain_name(name, "model name"))
    if not os.path.isdir(folder):
        raise KaffeError(f"no model named '{name}' in the zoo (known: {', '.join(model_names())})")
    readme = os.path.join(folder, "README.md")
    fields, body = read_front_matter(readme) if os.path.exists(readme) else ({}, "")
    fields.setdefault("name", name)
    return folder, fields, body


def weights_path(name, fields):
    return os.path.join(cache_dir(), _plain_name(name, "model name"),
                        _plain_name(fields["caffemodel"], "caffemodel file name"))


def _checksum(fields):
    """(algorithm, expected hex digest): sha1 as in Caffe's zoo, else sha256 where only that is published."""
    for algorithm in ("sha1", "sha256"):
        if fields.get(algorithm):
            return algorithm, fields[algorithm].lower()
    return None, None


def _digest(path, algorithm):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _weights_status(name, fields):
    if not fields.get("caffemodel_url"):
        return "no public weights"
    path = weights_path(name, fields)
    return "downloaded" if os.path.exists(path) else "available"


def list_models(out):
    rows = [("name", "input", "accuracy", "weights")]
    for name in model_names():
        _, fields, _ = model_info(name)
        accuracy = fields.get("accuracy", "-").split(" (")[0]
        rows.append((name, fields.get("input_shape", "-"), accuracy, _weights_status(name, fields)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3], file=out)


def show_model(name, out):
    folder, fields, body = model_info(name)
    for key, value in fields.items():
        print(f"{key}: {value}", file=out)
    print(f"files: {', '.join(sorted(f for f in os.listdir(folder) if not f.startswith('.')))}  (in {folder})",
          file=out)
    if fields.get("caffemodel_url"):
        path = weights_path(name, fields)
        state = "downloaded" if os.path.exists(path) else "not downloaded; run `kaffe zoo fetch " + name + "`"
        print(f"weights: {path} ({state})", file=out)
    if body:
        print(f"\n{body}", file=out)


def _download(url, destination, algorithm, progress):
    """Stream `url` into a temporary file beside `destination`; returns its path and the hex digest."""
    tmp = destination + ".part"
    h = hashlib.new(algorithm or "sha1")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0)
            with Progress(total, "Downloading", progress, unit="B") as bar:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        reason = getattr(e, "reason", None) or e
        raise KaffeError(f"cannot download {url}: {reason}. Are you offline? Download the file by other means and "
                         f"put it at {destination}") from None
    return tmp, h.hexdigest()


def fetch_model(name, out, force=False, progress=sys.stderr):
    """Download a model's weights into the cache and check them; returns the weights' path."""
    _, fields, _ = model_info(name)
    if not fields.get("caffemodel_url") or not fields.get("caffemodel"):
        raise KaffeError(f"model '{name}' has no public weights (its README gives no caffemodel_url); train it "
                         f"with `kaffe train --solver models/{name}/solver.prototxt`")
    algorithm, expected = _checksum(fields)
    path = weights_path(name, fields)
    if not force and os.path.exists(path) and (expected is None or _digest(path, algorithm) == expected):
        print(f"Model already exists: {path}", file=out)
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f"Downloading {fields['caffemodel_url']} to {path}", file=out)
    tmp, digest = _download(fields["caffemodel_url"], path, algorithm, progress)
    if expected is not None and digest != expected:   # checked before the file enters the cache
        os.unlink(tmp)
        raise KaffeError(f"model '{name}' did not download correctly: {algorithm} is {digest}, the README says "
                         f"{expected}. Run this again (the bad file was removed)")
    os.replace(tmp, path)
    if expected is None:
        print(f"warning: the README publishes no checksum; the file was not verified (sha1 {digest})", file=out)
    else:
        print(f"Checked {algorithm}: {digest}", file=out)
    print(f"Weights: {path}", file=out)
    return path


def main(argv=None):
    """argv: the arguments after `kaffe zoo`. Returns the exit status."""
    parser = argparse.ArgumentParser(prog="kaffe zoo", description="kaffe's model zoo")
    commands = parser.add_subparsers(dest="command", metavar="command")
    commands.add_parser("list", help="list the zoo's models")
    show = commands.add_parser("show", help="a model's details, files and README")
    show.add_argument("name")
    fetch = commands.add_parser("fetch", help="download a model's weights into the cache and check the checksum")
    fetch.add_argument("name")
    fetch.add_argument("--force", action="store_true", help="download again even if the file is there")
    add_quiet_flag(fetch)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "list":
            list_models(sys.stdout)
        elif args.command == "show":
            show_model(args.name, sys.stdout)
        else:
            fetch_model(args.name, sys.stdout, force=args.force, progress=stream(args.quiet))
    except KaffeError as e:
        print(f"kaffe zoo {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
