"""`kaffe parse_log LOG OUTDIR`: Caffe's tools/extra/parse_log.py, a training log to two CSV tables.

    kaffe parse_log [--verbose] [--delimiter ,] LOG OUTDIR   ->  OUTDIR/LOG.train, OUTDIR/LOG.test

`parse_log(path) -> (train_rows, test_rows)` gives Caffe's rows: one dict per display (train) or test pass,
NumIters, Seconds (since the first "Solving" line), LearningRate (the last `lr = ` logged), then every net output
by name, all floats. Caffe's quirks are kept, since tools downstream expect its numbers: a row goes in once it
has as many columns as the first row, the first row only when the next iteration starts, and the first row's
missing learning rate is copied from the second. Lines that are not glog-formatted are skipped (a log resumed
or appended to).
"""
import argparse
import csv
import datetime
import os
import re
import sys
from collections import OrderedDict

from ..engine.errors import KaffeValueError

ITERATION = re.compile(r"Iteration (\d+)")
TRAIN_OUTPUT = re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)")
TEST_OUTPUT = re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)")
LEARNING_RATE = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)")


def line_datetime(line, year):
    """The time of a glog line `I0210 13:39:22.381027 25210 solver.cpp:204] ...` (ValueError if it has none)."""
    fields = line.strip().split()
    if len(fields) < 2:
        raise ValueError("not a glog line")
    stamp = fields[1]
    dot = stamp.rfind(".")
    hour, minute, second = (int(x) for x in stamp[:dot].split(":"))
    return datetime.datetime(year, int(fields[0][1:3]), int(fields[0][3:]), hour, minute, second,
                             int(stamp[dot + 1:]))


def log_year(path):
    """The year the log was written, from the file's ctime (glog lines carry no year)."""
    return datetime.datetime.fromtimestamp(os.path.getctime(path)).year


def parse_log(path):
    """(train_rows, test_rows) of a Caffe or kaffe training log, as Caffe's parse_log.py returns them."""
    path = os.fspath(path)
    iteration, learning_rate = -1, float("nan")
    train_rows, test_rows = [], []
    train_row = test_row = None
    try:
        f = open(path, errors="replace")
    except OSError as e:
        raise KaffeValueError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        year = log_year(path)
        start = _start_time(f, year, path)
        last = start
        for line in f:
            match = ITERATION.search(line)
            if match:
                iteration = float(match.group(1))
            if iteration == -1:
                continue
            try:
                time = line_datetime(line, year)
            except ValueError:
                continue
            if time.month < last.month:   # the log went on into the next year
                year += 1
                time = line_datetime(line, year)
            last = time
            seconds = (time - start).total_seconds()
            match = LEARNING_RATE.search(line)
            if match:
                learning_rate = float(match.group(1))
            train_row = _add_output(TRAIN_OUTPUT, train_row, train_rows, line, iteration, seconds, learning_rate)
            test_row = _add_output(TEST_OUTPUT, test_row, test_rows, line, iteration, seconds, learning_rate)
    for rows in (train_rows, test_rows):
        if len(rows) > 1:   # the rate is logged after the first display and test: take the second row's
            rows[0]["LearningRate"] = rows[1]["LearningRate"]
    return train_rows, test_rows


def _start_time(lines, year, path):
    for number, line in enumerate(lines, 1):
        if "Solving" in line:
            try:
                return line_datetime(line, year)
            except ValueError:
                raise KaffeValueError(f"{path}:{number}: the 'Solving' line is not a glog line "
                                      f"(I1204 14:32:23.123456 ...); is this a Caffe training log?") from None
    raise KaffeValueError(f"{path} is not a Caffe training log: it has no 'Solving ...' line "
                          f"(a log of `caffe train` or `kaffe train`, as written to stderr)")


def _add_output(pattern, row, rows, line, iteration, seconds, learning_rate):
    """Caffe's parse_line_for_net_output: add a matched output to the open row, push rows that are full."""
    match = pattern.search(line)
    if match:
        if not row or row["NumIters"] != iteration:
            if row:
                rows.append(row)
            row = OrderedDict([("NumIters", iteration), ("Seconds", seconds), ("LearningRate", learning_rate)])
        try:
            row[match.group(2)] = float(match.group(3))
        except ValueError:
            raise KaffeValueError(f"unreadable output value '{match.group(3)}' in line: {line.strip()}") from None
    if row and rows and len(row) == len(rows[0]):
        rows.append(row)
        row = None
    return row


def save_csv_files(log_path, out_dir, train_rows, test_rows, delimiter=",", verbose=False):
    """Write OUTDIR/<log name>.train and .test (a table without rows is not written)."""
    name = os.path.basename(log_path)
    for rows, suffix in ((train_rows, ".train"), (test_rows, ".test")):
        write_csv(os.path.join(out_dir, name + suffix), rows, delimiter, verbose)


def write_csv(path, rows, delimiter=",", verbose=False):
    if not rows:
        if verbose:
            print(f"Not writing {path}; no lines to write")
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()), dialect=csv.excel, delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    if verbose:
        print(f"Wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="kaffe parse_log",
        description="Parse a Caffe training log into two CSV files containing training and testing information")
    parser.add_argument("logfile_path", help="Path to log file")
    parser.add_argument("output_dir", help="Directory in which to place output CSV files")
    parser.add_argument("--verbose", action="store_true", help="Print some extra info (e.g., output filenames)")
    parser.add_argument("--delimiter", default=",", help="Column delimiter in output files (default: ',')")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if len(args.delimiter) != 1:
        raise KaffeValueError(f"--delimiter must be one character, got '{args.delimiter}'")
    if not os.path.isdir(args.output_dir):
        raise KaffeValueError(f"output directory {args.output_dir} does not exist")
    train_rows, test_rows = parse_log(args.logfile_path)
    save_csv_files(args.logfile_path, args.output_dir, train_rows, test_rows, args.delimiter, args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
