"""`kaffe plot LOG [LOG2 ...] --out FILE.png|svg [--x iters|seconds] [--y loss|lr|<output name>]`.

The charts of Caffe's plot_training_log.py (test accuracy, test loss, train loss, learning rate, against
iterations or seconds) from the rows of `kaffe parse_log`, one line per log and table (train, test) holding
the column, with a legend; a logarithmic y axis for losses and rates that span more than a factor of 10.
Needs matplotlib (`pip install "kaffe[viz]"`).
"""
import argparse
import os
import sys

from ..engine.errors import KaffeError, KaffeValueError
from .parse_log import parse_log

X_COLUMNS = {"iters": ("NumIters", "Iters"), "seconds": ("Seconds", "Seconds")}
Y_ALIASES = {"lr": "LearningRate"}


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise KaffeError('kaffe plot needs matplotlib: pip install "kaffe[viz]"') from None
    return Figure


def _label(path):
    """Caffe's label: the log's file name without its .log suffix."""
    name = os.path.basename(path)
    return name[:-4] if name.endswith(".log") else name


def plot_logs(paths, x="iters", y="loss"):
    """A matplotlib Figure of column `y` against `x` for every log; one line per log and table."""
    if x not in X_COLUMNS:
        raise KaffeValueError(f"--x must be iters or seconds, got '{x}'")
    x_column, x_label = X_COLUMNS[x]
    y_column = Y_ALIASES.get(y, y)
    figure = _figure_class()(figsize=(8, 5))
    axes = figure.add_subplot()
    kinds, found = [], set()
    for path in paths:
        tables = dict(zip(("Train", "Test"), parse_log(path)))
        if y == "lr":   # every row carries the rate; the train rows come at every display
            tables = {"Train": tables["Train"] or tables["Test"]}
        holding = {kind: rows for kind, rows in tables.items() if rows and y_column in rows[0]}
        found.update(column for rows in tables.values() for row in rows[:1] for column in row)
        for kind, rows in holding.items():
            points = [(row[x_column], row[y_column]) for row in rows if y_column in row]
            label = _label(path) if len(holding) == 1 else f"{_label(path)} ({kind.lower()})"
            axes.plot([p[0] for p in points], [p[1] for p in points], label=label, marker=".", linewidth=0.75)
            kinds.append(kind)
    if not axes.lines:
        names = sorted(found - {"NumIters", "Seconds", "LearningRate"}) + ["lr"]
        raise KaffeValueError(f"no log has a '{y}' column to plot; the logs have: {', '.join(names)}")
    values = [v for line in axes.lines for v in line.get_ydata()]
    positive = [v for v in values if v > 0]
    if (y == "lr" or "loss" in y) and len(positive) == len(values) and max(values) > 10 * min(values):
        axes.set_yscale("log")
    kind = " & ".join(sorted(set(kinds), reverse=True))
    y_name = "learning rate" if y == "lr" else y
    axes.set_title(f"{kind} {y_name}  vs. {x_label}")
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_name)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper right" if y == "lr" or "loss" in y else "lower right")
    return figure


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kaffe plot", description=__doc__.split("\n\n")[1])
    parser.add_argument("logs", nargs="+", metavar="LOG", help="Caffe or kaffe training logs")
    parser.add_argument("--out", required=True, metavar="FILE", help="the chart: a .png or .svg file")
    parser.add_argument("--x", default="iters", choices=sorted(X_COLUMNS), help="the x axis (default: iters)")
    parser.add_argument("--y", default="loss", help="loss, lr, or an output name such as accuracy (default: loss)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    extension = os.path.splitext(args.out)[1].lower()
    if extension not in (".png", ".svg"):
        raise KaffeValueError(f"--out must end in .png or .svg, got '{args.out}'")
    plot_logs(args.logs, args.x, args.y).savefig(args.out, format=extension[1:])
    print(f"Wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
