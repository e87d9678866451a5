"""`cnnflow export` / `mlflow run . -e export`: ONNX and int8 models, checked and registered."""

from __future__ import annotations

import click

from components.steps.params import ExportParams
from pipelines.options import dataclass_options, job_run_id, reachable_tracking_uri, user_errors


@click.command()
@dataclass_options(ExportParams)
def export_command(**kwargs) -> None:
    """ONNX fp32 and int8 exports of a model, checked against it on its test split; the ones
    that pass their gate are logged and registered (alias challenger, never promoted)."""
    from components.steps.export import export

    params = ExportParams(**kwargs)
    with user_errors():
        params.validate()
        uri = reachable_tracking_uri()
        outcome = export(params, uri, job_run_id=job_run_id(params.experiment, uri))
    ref = outcome.reference
    click.echo(f"{outcome.run_name}  run {outcome.run_id}  source {outcome.source_run_id}")
    click.echo(f"  pytorch  test_acc {ref['test_acc']:.4f}  {ref['model_size_mb']:.2f} MB  "
               f"p50 {ref['latency_ms_p50']:.2f} ms  "
               f"{ref['throughput_images_per_sec']:.0f} img/s")
    for r in outcome.results:
        m = r.metrics
        verdict = (f"registered {r.version.name} v{r.version.version} (@challenger)"
                   if r.passed else f"rejected: {r.reason}")
        click.echo(f"  {r.fmt:<7}  test_acc {m['test_acc']:.4f} ({m['test_acc_delta']:+.4f})  "
                   f"{m['model_size_mb']:.2f} MB  p50 {m['latency_ms_p50']:.2f} ms  "
                   f"{m['throughput_images_per_sec']:.0f} img/s  max|dp| "
                   f"{m['max_abs_prob_diff']:.2g}  top1 {m['top1_agreement']:.4f}  {verdict}")
    click.echo(outcome.url)
    if any(r.passed for r in outcome.results):
        click.echo("not promoted: cnnflow promote applies the promotion rule when you choose")


export_command.name = "export"

if __name__ == "__main__":
    export_command()
