"""kaffe run SCRIPT.py [ARGS...]: run an unchanged pycaffe script, or a notebook exported to .py, on kaffe.

The script's `import caffe` (and `from caffe import layers as L`, `from caffe.proto import caffe_pb2`, ...)
imports kaffe: kaffe.install_as_caffe() runs first. The script then runs as `python SCRIPT.py ARGS...` would run
it: as __main__, with sys.argv = [SCRIPT.py, ARGS...] and the script's folder first on sys.path. Its exceptions
are shown as Python shows them (the script's own traceback) with exit status 1, and sys.exit(n) passes n on.

A notebook exported with `jupyter nbconvert --to script` calls get_ipython() for its magics; outside IPython
kaffe provides the ones pycaffe's notebooks use: %matplotlib (figures go to the non-interactive Agg backend),
%time, %timeit, %cd and `!command` lines.
"""
import argparse
import os
import runpy
import subprocess
import sys
import time
import timeit
import traceback

from ..engine.errors import KaffeError
from ..engine.pycaffe_modules import install_as_caffe


def get_ipython():
    """The shell of an exported notebook, working in the namespace of the code that calls it."""
    return NotebookShell(sys._getframe(1).f_globals)


class NotebookShell:
    """The part of IPython's shell that exported notebooks call: line magics and `!` commands."""

    def __init__(self, namespace):
        self.namespace = namespace  # the script's globals, where %time and %timeit run their statement

    def run_line_magic(self, name, line):
        magic = getattr(self, f"_magic_{name}", None)
        if magic is None:
            raise KaffeError(f"kaffe run: the notebook magic %{name} is not supported outside IPython "
                             f"(supported: %matplotlib, %time, %timeit, %cd and !commands)")
        return magic(line)

    def system(self, command):
        subprocess.call(command, shell=True)

    def _magic_matplotlib(self, line):
        import matplotlib
        matplotlib.use("Agg")  # no window to draw in: figures are kept (plt.savefig works), not shown

    def _magic_cd(self, line):
        os.chdir(os.path.expanduser(line.strip() or "~"))

    def _magic_time(self, line):
        start = time.perf_counter()
        exec(line, self.namespace)
        print(f"Wall time: {time.perf_counter() - start:.3g} s")

    def _magic_timeit(self, line):
        timer = timeit.Timer(line, globals=self.namespace)
        loops, _ = timer.autorange()
        best = min(timer.repeat(repeat=3, number=loops)) / loops
        print(f"{loops} loops, best of 3: {best:.3g} s per loop")


def _parser():
    parser = argparse.ArgumentParser(prog="kaffe run", description="Run an unchanged pycaffe script "
                                     "(`import caffe`) on kaffe, as `python SCRIPT.py ARGS...` would.")
    parser.add_argument("script", help="the Python script (or notebook exported to .py)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    return parser


def _script_traceback(error, script):
    """Python's report of an exception, from the script's first frame on (without kaffe run's frames)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != script:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(error), error, tb or error.__traceback__))


def run_script(script, args):
    """Run `script` as __main__ with `args`; returns its exit status."""
    if not os.path.isfile(script):
        raise KaffeError(f"cannot open script '{script}': no such file")
    install_as_caffe()
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [script] + list(args)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, init_globals={"get_ipython": get_ipython}, run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:
        sys.stderr.write(_script_traceback(error, script))
        return 130
    except Exception as error:  # the user's code failed: show it as Python would, not as a kaffe error
        sys.stderr.write(_script_traceback(error, script))
        return 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


def main(argv=None):
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run_script(args.script, args.args)


if __name__ == "__main__":
    from .cli import main as kaffe_main
    sys.exit(kaffe_main(["run"] + sys.argv[1:]))
