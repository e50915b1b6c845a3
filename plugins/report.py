"""report: write the evaluation report (launcher/commands/report.py) at the end of a run: training
curves, confusion matrix, per-class PR and ROC curves (PNGs) and report.json with
precision / recall / F1 / AUC per class, into <run dir>/report/. The same report on demand:
`python -m launcher.report RUN_DIR`.

The main process predicts the validation set once with the final weights as written to
final/model.safetensors (loaded into a fresh model: the same file whatever the strategy,
also under ZeRO-3, where no rank holds the whole model); other ranks wait.
When a wandb run is active, the images and the per-class table are logged to it. `report`
must be listed before `wandb` (the recipe loader refuses the other order): hooks run in
recipe order, and wandb's on_train_end closes its run.

Hooks: on_train_end. No state.
"""

from __future__ import annotations

from pydantic import Field

from launcher.registry import Plugin, PluginOptions, register


@register("report")
class Report(Plugin):
    """Evaluation report at the end of the run: curves, confusion matrix, PR/ROC, report.json."""

    reports_only = True

    class Options(PluginOptions):
        wandb: bool = Field(True, description="also log the images and table to the active wandb run, if any")

    listed_before = {"wandb": "the report logs its images to the wandb run, which wandb closes at the end"}

    @classmethod
    def check_recipe(cls, recipe, options):
        if recipe.data.val is None:
            return "the report evaluates the validation set, and the recipe sets no data.val"
        return None

    def on_train_end(self, ctx) -> None:
        if ctx.is_main:
            from safetensors.torch import load_model

            from launcher.models.factory import create_model
            from launcher.commands.report import predict, write_report
            from launcher.runlog import final_weights

            weights = final_weights(ctx.run_dir)
            model = create_model(ctx.recipe.model).to(ctx.accelerator.device)
            load_model(model, str(weights))
            with ctx.accelerator.autocast():
                probs, labels = predict(ctx.recipe, model, ctx.accelerator.device)
            report, images = write_report(ctx.run_dir, ctx.recipe, probs, labels, weights=weights)
            print(f"\n[report] accuracy {report['accuracy']:.4f}, macro F1 {report['macro']['f1']:.4f}: "
                  f"{images[0].parent}", flush=True)
            if self.options.wandb:
                self._log_to_wandb(report, images)
        ctx.accelerator.wait_for_everyone()

    @staticmethod
    def _log_to_wandb(report: dict, images: list) -> None:
        try:
            import wandb
        except ImportError:
            return
        if wandb.run is None:
            return
        columns = ["class", "precision", "recall", "f1", "support", "roc_auc", "average_precision"]
        table = wandb.Table(columns=columns, data=[[name] + [entry[c] for c in columns[1:]]
                                                   for name, entry in report["per_class"].items()])
        wandb.log({"report/per_class": table, **{f"report/{p.stem}": wandb.Image(str(p)) for p in images}})
