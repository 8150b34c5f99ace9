"""The `rlhf` application: one Typer app that gathers the commands of each concern."""

import typer

from cli import bench, evaluate, run, serve, train

app = typer.Typer(help="RLHF (SFT, reward model, PPO) as gRPC model services.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
bench_app = typer.Typer(help="Benchmarks (not tests): print side-by-side figures.", no_args_is_help=True)

app.command()(serve.serve)
app.command()(run.controller)
app.command()(evaluate.score)
app.command("eval-rm")(evaluate.eval_rm)
app.command("sft")(train.sft)
app.command("train-rm")(train.train_rm)
app.command()(run.demo)
app.add_typer(bench_app, name="bench")
bench_app.command("generate")(bench.generate)
bench_app.command("train-rm")(bench.train_rm)
bench_app.command("metrics")(bench.metrics)
bench_app.command("overload")(bench.overload)
bench_app.command("score")(bench.score)
bench_app.command("ppo")(bench.ppo)
bench_app.command("reference")(bench.reference)

if __name__ == "__main__":
    app()
