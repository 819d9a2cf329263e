"""The ``dwf`` command: the whole pipeline (``dwf run``) or one stage at a time on a run root."""
from __future__ import annotations

from typing import List, NoReturn, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="DeepWeightFlow on Ray: generate neural-network weights from a zoo of checkpoints.")

_VERBOSE = {"on": False}


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v",
                                      help="show Ray's own log lines on the terminal (default: <root>/logs/dwf.log)")):
    """DeepWeightFlow on Ray: generate neural-network weights from a zoo of checkpoints."""
    _VERBOSE["on"] = verbose


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr naming the problem, then exit (2: a bad command line or input)."""
    typer.echo(f"dwf: error: {message}", err=True)
    raise typer.Exit(code)


_ROOT = typer.Option(None, "--root", help="run root: a folder or s3://bucket/prefix (default runs/<name>)")
_NAME = typer.Option(None, "--name", help="run name under runs/ (default: the preset's name)")
_PRESET = typer.Option(None, "--preset", help="preset to start a new run root from (a name, or a .json file)")
_SET = typer.Option([], "--set", help="override a config value: section.key=value (repeatable)")
_RESTART = typer.Option(None, "--restart-from", help="redo this stage and every stage after it")


def _pipeline(preset: Optional[str], root: Optional[str], name: Optional[str], overrides: List[str],
              restart_from: Optional[str] = None, no_canon: bool = False):
    from dwf_ray.config import RunConfig
    from dwf_ray.presets import preset as load_preset
    from dwf_ray.pipeline import Pipeline
    cfg: Optional[RunConfig] = None
    try:
        if preset:
            cfg = load_preset(preset).with_overrides(list(overrides) + (["canon.enabled=false"] if no_canon else []))
        elif overrides or no_canon:
            raise ValueError("--set and --no-canon need --preset (they define a new config)")
        if root is None:
            if not (name or preset):
                raise ValueError("give --root, --name or --preset")
            root = f"runs/{name or cfg.preset}"
        return Pipeline(root, cfg, restart_from=restart_from, log=typer.echo, quiet=not _VERBOSE["on"])
    except ValueError as exc:
        fail(str(exc))


@app.command()
def run(preset: str = typer.Option("digits-mlp", "--preset"), root: Optional[str] = _ROOT,
        name: Optional[str] = _NAME, set_: List[str] = _SET,
        no_canon: bool = typer.Option(False, "--no-canon", help="skip canonicalization (ablation)"),
        restart_from: Optional[str] = _RESTART):
    """Run every stage: zoo, canon, pca, flow, sample, eval (each skipped when already complete)."""
    _pipeline(preset, root, name, set_, restart_from, no_canon).run()


zoo_app = typer.Typer()
app.add_typer(zoo_app, name="zoo")


@zoo_app.callback(invoke_without_command=True)
def zoo(ctx: typer.Context, preset: Optional[str] = _PRESET, root: Optional[str] = _ROOT,
        name: Optional[str] = _NAME, set_: List[str] = _SET, restart_from: Optional[str] = _RESTART):
    """Train the zoo as Ray tasks (zoo/ + manifest.parquet), or `dwf zoo import` checkpoints trained elsewhere."""
    if ctx.invoked_subcommand is None:
        _pipeline(preset, root, name, set_, restart_from).run_stage("zoo")
    elif preset or root or name or set_ or restart_from:
        fail(f"put the options after the subcommand: dwf zoo {ctx.invoked_subcommand} ... --root ...")


def _arch_json(value: str) -> str:
    """The --arch value (ArchSpec JSON, or @FILE holding it, local or s3://) as validated ArchSpec JSON."""
    from dwf_ray import store
    from dwf_ray.archs import ArchSpec, build_model
    try:
        arch = ArchSpec.from_json(store.read_bytes(value[1:]).decode() if value.startswith("@") else value)
        build_model(arch)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        fail(f"--arch {value!r} is not a usable ArchSpec: {exc}")
    return arch.to_json()


@zoo_app.command("import")
def zoo_import(source: str = typer.Argument(..., help="folder or s3:// prefix: transformers save_pretrained folders "
                                                      "(config.json + weights), .safetensors/.pt/.pth/.bin files, "
                                                      "or a Model Zoo (Ray Tune model folders with params.json)"),
               arch: Optional[str] = typer.Option(None, "--arch", help='ArchSpec JSON, e.g. {"family": "mlp", '
                                                  '"args": {...}}, or @FILE holding it; default: what the files say '
                                                  "(a config.json, our safetensors metadata, a Model Zoo's "
                                                  "params.json)"),
               dataset: Optional[str] = typer.Option(None, "--dataset", help="the run's data (default: digits; for a "
                                                     "Model Zoo: zoo, its own dataset.pt)"),
               preset: str = typer.Option("digits-mlp", "--preset"),
               epoch: Optional[int] = typer.Option(None, "--epoch", help="Model Zoo: the checkpoint epoch to import "
                                                   "(default: the zoo's last)"),
               max_abs_weight: Optional[float] = typer.Option(None, "--max-abs-weight", help="Model Zoo: models "
                                                              "with a weight above this in absolute value become "
                                                              "error rows"),
               root: Optional[str] = _ROOT, name: Optional[str] = _NAME, set_: List[str] = _SET):
    """Import checkpoints trained elsewhere as the zoo of a run root; each unusable file keeps an error row."""
    import json
    from dwf_ray.zoo.modelzoo import is_model_zoo
    if is_model_zoo(source):
        _import_model_zoo(source, arch, dataset, preset, epoch, max_abs_weight, root, name, list(set_))
        return
    if epoch is not None or max_abs_weight is not None:
        fail(f"--epoch and --max-abs-weight are for Model Zoo folders; {source} is not one")
    if arch is None:
        from dwf_ray.zoo.formats import FormatError, infer_arch
        try:
            arch_json = infer_arch(source).to_json()
        except (FormatError, FileNotFoundError) as exc:
            fail(str(exc))
        typer.echo(f"[zoo] architecture from the files: {arch_json}")
    else:
        arch_json = _arch_json(arch)
    overrides = list(set_) + [f"zoo.arch={arch_json}", f"zoo.dataset={json.dumps(dataset or 'digits')}"]
    _pipeline(preset, root, name, overrides).import_zoo(source)


def _import_model_zoo(source: str, arch: Optional[str], dataset: Optional[str], preset: str, epoch: Optional[int],
                      max_abs_weight: Optional[float], root: Optional[str], name: Optional[str], overrides: list):
    """`dwf zoo import` of a Model Zoo folder: the architecture from every params.json (one, or refused), the data
    from its dataset.pt unless --dataset says otherwise."""
    import json
    from dwf_ray.zoo.formats import FormatError, common_arch
    from dwf_ray.zoo.modelzoo import model_folders, read_all_params
    from dwf_ray.zoo.stage import run_modelzoo_import
    if epoch is not None and epoch < 0:
        fail(f"--epoch {epoch}: must be >= 0")
    if max_abs_weight is not None and not max_abs_weight > 0:
        fail(f"--max-abs-weight {max_abs_weight}: must be > 0")
    try:
        found = common_arch([f for _, f in read_all_params(model_folders(source))], source)
    except (FormatError, FileNotFoundError) as exc:
        fail(str(exc))
    arch_json = _arch_json(arch) if arch else found.to_json()
    if arch_json != found.to_json():
        fail(f"--arch {arch_json} differs from what the zoo's params.json say: {found.to_json()}")
    typer.echo(f"[zoo] Model Zoo folder; architecture from params.json: {arch_json}")
    dataset = dataset or "zoo"
    extra = [f"zoo.arch={arch_json}", f"zoo.dataset={json.dumps(dataset)}"]
    if dataset == "zoo" and not any(o.startswith("zoo.data_root=") for o in overrides):
        extra.append(f"zoo.data_root={json.dumps(source)}")
    pipe = _pipeline(preset, root, name, overrides + extra)
    pipe.run_stage("zoo", lambda cfg, run_store: run_modelzoo_import(cfg, run_store, source, epoch, max_abs_weight))


app.command("import", hidden=True)(zoo_import)   # the earlier spelling, `dwf import`


def _stage_command(stage: str, doc: str):
    def command(preset: Optional[str] = _PRESET, root: Optional[str] = _ROOT, name: Optional[str] = _NAME,
                set_: List[str] = _SET, restart_from: Optional[str] = _RESTART):
        pipe = _pipeline(preset, root, name, set_, restart_from)
        pipe.run_stage(stage)
        if stage == "eval":
            pipe.print_summary()
    command.__doc__ = doc
    app.command(name=stage)(command)


for _stage, _doc in [
    ("canon", "Canonicalize the zoo onto the reference with Ray Data (canon/)."),
    ("pca", "Distributed dual PCA with GramShard actors (pca/)."),
    ("flow", "Train the flow model with Ray Train (flow/model.pt)."),
    ("eval", "Evaluate zoo, generated models and baselines; write report/."),
]:
    _stage_command(_stage, _doc)


@app.command()
def export(root: str = typer.Option(..., "--root", help="run root whose sample stage is complete"),
           format_: str = typer.Option(..., "--format", help="hf (transformers folders, bert), torchvision "
                                                             "(state_dict .pt files), safetensors (ours), modelzoo "
                                                             "(the public Model Zoos' own folders)"),
           out: str = typer.Option(..., "--out", help="folder or s3:// prefix to write the models to"),
           no_recalibrate: bool = typer.Option(False, "--no-recalibrate", help="torchvision: keep default BatchNorm "
                                               "statistics instead of recalibrating on the training split")):
    """Write the run's generated models (samples/) in the form their library loads directly (+ manifest.parquet)."""
    from dwf_ray.sample.export import ExportError, export_samples
    try:
        manifest = export_samples(root, format_, out, recalibrate=not no_recalibrate)
    except (ExportError, FileNotFoundError) as exc:
        fail(str(exc))
    typer.echo(f"exported {len(manifest)} models as {format_} to {out}; load one with: {manifest['loads_with'].iloc[0]}")


@app.command()
def sample(preset: Optional[str] = _PRESET, root: Optional[str] = _ROOT, name: Optional[str] = _NAME,
           set_: List[str] = _SET, restart_from: Optional[str] = _RESTART,
           endpoint: Optional[str] = typer.Option(None, "--endpoint", help="URL of a running `dwf serve`: take the "
                                                                           "models from it instead"),
           out: Optional[str] = typer.Option(None, "--out", help="with --endpoint: folder or s3:// prefix to write"),
           n: int = typer.Option(1, "--n", help="with --endpoint: how many models"),
           seed: Optional[int] = typer.Option(None, "--seed"), temperature: Optional[float] = typer.Option(None, "--temperature"),
           token_file: Optional[str] = typer.Option(None, "--token-file", help="bearer token (default $DWF_SERVE_TOKEN)")):
    """Generate models and decode them to checkpoints (samples/, one sub-folder per sweep temperature), or fetch
    them from a running service with --endpoint."""
    if endpoint is None:
        _pipeline(preset, root, name, set_, restart_from).run_stage("sample")
        return
    from dwf_ray.serve.auth import read_token
    from dwf_ray.serve.client import SampleError, write_from_endpoint
    if not out:
        fail("--endpoint needs --out DIR")
    try:
        manifest = write_from_endpoint(endpoint, out, n, seed, temperature, read_token(token_file))
    except (SampleError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"wrote {len(manifest)} models from {endpoint} to {out}")


@app.command()
def serve(root: str = typer.Option(..., "--root", help="a finished run root (local or s3://)"),
          host: str = typer.Option("127.0.0.1", "--host", help="bind address (a non-loopback one needs a token)"),
          port: int = typer.Option(8000, "--port"),
          token_file: Optional[str] = typer.Option(None, "--token-file", help="bearer token (default $DWF_SERVE_TOKEN)"),
          insecure: bool = typer.Option(False, "--insecure", help="allow a non-loopback host without a token"),
          set_: List[str] = typer.Option([], "--set", help="a Serve option: key=value (see dwf_ray/serve/config.py)")):
    """Serve new models of a finished run over HTTP (Ray Serve, batched); blocks until Ctrl-C."""
    from dwf_ray.serve.launch import serve_main
    try:
        serve_main(root, host, port, token_file, insecure, list(set_), log=typer.echo)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))


@app.command()
def conditional(
        from_: List[str] = typer.Option(..., "--from", help="run root of one class, complete through pca "
                                                           "(repeat; the order gives the labels)"),
        root: str = typer.Option(..., "--root", help="output root: a folder or s3://bucket/prefix"),
        class_name: List[str] = typer.Option([], "--class-name", help="class names (default: the roots' folder names)"),
        guidance: str = typer.Option("0,1,2", "--guidance", help="guidance scales w, comma-separated "
                                                                 "(0: unconditional, 1: conditional)"),
        no_baselines: bool = typer.Option(False, "--no-baselines", help="skip the noise/interpolation baselines"),
        set_: List[str] = _SET):
    """One class-conditional flow over several zoos (classifier-free guidance); per-class report."""
    from dwf_ray.conditional import ConditionalConfig, run_conditional
    try:
        cfg = ConditionalConfig(roots=list(from_), names=list(class_name) or None, baselines=not no_baselines,
                                guidance=[float(w) for w in guidance.split(",")]).with_overrides(list(set_))
        cfg.class_names()
        run_conditional(cfg, root, log=typer.echo)
    except ValueError as exc:
        fail(str(exc))


@app.command()
def presets():
    """List the presets."""
    from dwf_ray.presets import PRESETS
    for key in sorted(PRESETS):
        typer.echo(key)


_SIGNALLED: list = []    # the SIGINT/SIGTERM that stopped this command, if one did


def _stop_on_signal(signum, frame) -> NoReturn:
    """SIGINT or SIGTERM: leave whatever runs now; ``entry`` then stops Ray and exits with 128 + the signal."""
    _SIGNALLED.append(signum)
    raise SystemExit(128 + signum)


def _run_app():
    """The command's exit status (what ``sys.exit`` takes); problems become the one line ``entry`` promises."""
    from dwf_ray.store import StoreError
    try:
        app()
    except SystemExit as exc:
        return exc.code
    except (StoreError, FileNotFoundError, PermissionError) as exc:   # here, or in a Ray task (its cause)
        if _SIGNALLED:
            return 1
        typer.echo(f"dwf: error: {getattr(exc, 'cause', None) or exc}", err=True)
        return 2
    except Exception as exc:
        from dwf_ray.pipeline import StageFailed   # only a stage that ran can raise it (its module is loaded)
        if _SIGNALLED:      # what the interrupted code raised on its way out: the signal is the news
            return 1
        if not isinstance(exc, StageFailed):
            raise
        typer.echo(f"dwf: error: {exc}", err=True)   # the traceback is in the run's log
        return 1
    return 0


def entry() -> None:
    """The ``dwf`` console script (and ``jobs/run.py``): problems a user can act on (a missing bucket, object or
    file, access denied, an endpoint that does not answer, a root another run holds) become one line and exit
    code 2; a stage that fails for another reason is one line naming it and the cause, and exit code 1.

    However the command ends (done, an error, SIGINT or SIGTERM), the local Ray it started stops with every
    process of its session (``runtime.shutdown``); a signal is one line and exit code 128 + its number (130, 143).
    """
    import signal
    import sys
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _stop_on_signal)
        code = _run_app()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)       # stopping Ray is not interrupted half-way
        if "ray" in sys.modules:
            from dwf_ray.runtime import shutdown
            shutdown()
    if _SIGNALLED:
        typer.echo(f"dwf: stopped by {signal.Signals(_SIGNALLED[0]).name}; the same command resumes the run",
                   err=True)
        sys.exit(128 + _SIGNALLED[0])
    sys.exit(code)


if __name__ == "__main__":
    entry()
