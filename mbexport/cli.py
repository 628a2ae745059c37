"""The ``mbexport`` command line: a thin layer over the pipeline stages.

Each command parses its options, calls one stage function and prints the result. Errors the user can act
on (``MbexportError``) become one line on stderr and a non-zero exit code; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import sys

import click
import typer
from rich.console import Console

from mbexport.errors import MbexportError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Megatron-BERT checkpoints to validated ONNX, TensorRT and Triton artifacts.")
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")):
    _state["debug"] = debug


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        exit_code = app(args=argv, standalone_mode=False)  # commands end with typer.Exit(code) or None
    except MbexportError as error:
        if _state["debug"]:
            raise
        err_console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except click.ClickException as error:  # usage errors
        error.show()
        sys.exit(error.exit_code)
    except click.Abort:
        sys.exit(130)
    sys.exit(exit_code if isinstance(exit_code, int) else 0)


# Commands are registered below, one block per pipeline stage.
