"""What a run checks before anything trains, for the commands that do not train: `python -m
launcher --check` and `python -m launcher.slurm submit` (a job must not wait in a queue for
hours to fail on a misspelled model name or a missing shard)."""

from __future__ import annotations

from launcher.errors import LauncherError, did_you_mean


def preflight(recipe) -> list[str]:
    """Raise on a model name timm does not know or a shard that is missing (local, s3://, http); return the
    shell commands the recipe's `pipe:` shards will run (WebDataset runs them through a shell)."""
    import timm

    import launcher.models  # noqa: F401  (registers the WideResNets with timm)
    from launcher.data import expand_pattern, is_local

    if not timm.is_model(recipe.model.name):
        raise LauncherError(
            f"Unknown model '{recipe.model.name}' (model.name).{did_you_mean(recipe.model.name, timm.list_models())}")
    from pathlib import Path

    if recipe.model.pretrained_file:
        from launcher.models import pretrained_weights_file

        pretrained_weights_file(recipe.model.pretrained_file)  # missing: an error now, not in the queue

    from launcher.data import fetch_options
    from launcher.remote import Remote, kind

    commands = []
    for key in ("train", "val"):
        pattern = getattr(recipe.data, key)
        if not pattern:
            continue
        urls = expand_pattern(pattern)
        for url in urls:
            if url.startswith("pipe:"):
                commands.append(url[len("pipe:"):])
            elif is_local(url) and not Path(url).is_file():
                raise LauncherError(f"data.{key}: shard '{url}' does not exist (pattern '{pattern}'). Check the path "
                                    "and the brace range, or write the shards with `python -m launcher.shards`.")
        # s3:// and http(s):// shards: one listing (S3) or HEAD requests, as a run makes first.
        stored = [u for u in urls if kind(u) in ("s3", "http")]
        if stored:
            store = Remote(fetch_options(recipe.data))
            sizes = store.sizes(stored)
            absent = [u for u in stored if sizes[u] is None]
            if absent:
                raise LauncherError(f"data.{key}: shard '{absent[0]}' does not exist ({len(absent)} of {len(stored)} "
                                    f"missing; pattern '{pattern}'{', endpoint ' + store.endpoint() if kind(absent[0]) == 's3' else ''}).")
    return commands
