"""The ``dpbr`` command line (Typer). Parsing only: every command builds a spec and calls a job (:mod:`dpbr.jobs`).

Every error a user can cause prints ONE line ``dpbr: error: <option>: <what is allowed>`` on standard
error and exits with code 2, leaving no output file and no traceback (:func:`main`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import typer

try:  # typer >= 0.20 vendors click as typer._click; older versions depend on click itself
    from typer._click import exceptions as _click_exc
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as _click_exc

from dpbr.errors import UsageError

app = typer.Typer(
    name="dpbr",
    help="Data privacy and Byzantine resilience in distributed SGD: simulate, measure, attack, plot.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
#: Most torch CPU threads a command accepts (``torch.set_num_threads`` takes a C int; more threads than
#: cores only slows a job down).
MAX_THREADS = 1024

data_app = typer.Typer(help="Prepare datasets (download, import a local copy, verify, cache).", no_args_is_help=True)
app.add_typer(data_app, name="data")


# ----------------------------------------------------------------------------------------------- #
# Progress reporting shared by long commands


def make_progress(label: str, total: int, quiet: bool = False) -> tuple[Callable[[int, int, float | None], None], Callable[[], None]]:
    """A progress callback ``(done, total, last_accuracy)`` and a ``close()``.

    On a terminal: a rich progress bar with steps/s and the last accuracy. Otherwise: plain lines on
    standard error every 10 % of the work (or every 30 s), so logs stay readable.
    """
    if quiet:
        return (lambda done, tot, acc: None), (lambda: None)
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[rate]} steps/s"), TextColumn("acc {task.fields[acc]}"),
                       TimeRemainingColumn(), transient=False)
        task = bar.add_task(label, total=total, rate="-", acc="-")
        bar.start()
        start = time.perf_counter()

        def update(done: int, tot: int, acc: float | None) -> None:
            rate = done / max(time.perf_counter() - start, 1e-9)
            fields: dict[str, Any] = {"rate": f"{rate:.1f}"}
            if acc is not None:
                fields["acc"] = f"{acc:.3f}"
            bar.update(task, completed=done, **fields)

        return update, bar.stop
    state = {"next": 0.0, "t": time.perf_counter(), "start": time.perf_counter(), "acc": None}

    def plain(done: int, tot: int, acc: float | None) -> None:
        if acc is not None:
            state["acc"] = acc
        now = time.perf_counter()
        if done / max(tot, 1) >= state["next"] or now - state["t"] >= 30 or done == tot:
            rate = done / max(now - state["start"], 1e-9)
            acc_txt = "-" if state["acc"] is None else f"{state['acc']:.4f}"
            print(f"{label}: step {done}/{tot} ({rate:.1f} steps/s, last accuracy {acc_txt})", file=sys.stderr, flush=True)
            state["next"] = done / max(tot, 1) + 0.1
            state["t"] = now

    return plain, (lambda: None)


# ----------------------------------------------------------------------------------------------- #
# dpbr train


def _steps_list(text: Optional[str], option: str) -> frozenset[int]:
    if text is None or not text.strip() or text.strip().lower() == "none":
        return frozenset()
    try:
        return frozenset(int(t) for t in text.replace(";", ",").split(",") if t.strip())
    except ValueError:
        raise UsageError(option, f"expected comma-separated step numbers such as '0,500,1000', got {text!r}") from None


def _model_help() -> str:
    """``--model`` help of ``dpbr train``: every model of the catalogue with its parameters' defaults."""
    from dpbr.spec import model_terms

    models = ", ".join(model_terms())
    return (f"Model: {models}. logit d=69, cnn d=431,080 (the study's); mnist-example = PyTorch's MNIST example "
            "network (1.2 M parameters at width=1) of the bucketing experiments (Karimireddy, He, Jaggi 2022, "
            "arXiv 2006.09365).")


def _partition_help() -> str:
    """``--partition`` help of ``dpbr train``: every partition scheme dpbr knows, with examples."""
    from dpbr.spec import PARTITIONS

    return (f"Honest workers' data: {', '.join(PARTITIONS)} — iid (every worker samples the whole training set), "
            "shards (label-sorted contiguous shards), 'dirichlet(alpha=0.5)', 'longtail(beta=0.5,shards=false)' "
            "(class c thinned to beta^c). Byzantine workers that compute on data sample IID (as in Karimireddy, "
            "He, Jaggi 2022, arXiv 2006.09365).")


_SYSTEM_HELP = (
    "Simulated system: server (one trusted parameter server); 'draco(r=3,code=repetition|cyclic,vote=exact|tolerance,tol=0)' "
    "(redundant gradients decoded by vote, Chen et al. 2018, arXiv 1803.09877; needs r >= 2f+1 and --gar average); "
    "'guanyu(m=6,byzantine=1,attack=random|negate|equivocate|silent,q=n-f,qbar=m-byzantine)' (replicated servers, "
    "some Byzantine, medians of quorums; El Mhamdi et al. 2019, arXiv 1905.03853; needs 2f+3 <= q <= n (default n-f) and "
    "2*byzantine+3 <= qbar <= m-byzantine); 'liubei(m=4,byzantine=1,attack=random,gather=10)' (workers pull one "
    "server's model through a Lipschitz and a model-distance filter; El Mhamdi, Guerraoui, Guirguis, PODC 2020; "
    "needs m >= 3*byzantine+1).")
_NETWORK_HELP = (
    "Network: 'ideal(latency=1e-4,bandwidth=1.25e9,compute=0)' or 'lossy(drop=0.01,fill=nans|zeros|lost,...)': "
    "each UDP packet (1472 bytes) of a worker's gradient is lost with probability drop and arrives as NaNs or zeros, "
    "or the whole message is lost (AggregaThor's lossy transport, Damaskinos et al., SysML 2019). latency (s per "
    "round), bandwidth (bytes/s per node) and compute (s per gradient) drive the simulated step time.")
_MODEL_HELP = _model_help()
_PARTITION_HELP = _partition_help()


@app.command("train")
def train_cmd(
    dataset: str = typer.Option("mnist", "--dataset", help="Dataset: mnist, fashion-mnist, cifar10, cifar100, phishing, synthetic."),
    model: str = typer.Option("cnn", "--model", help=_MODEL_HELP),
    workers: int = typer.Option(11, "--workers", help="Number of workers n."),
    byzantine: int = typer.Option(5, "--byzantine", help="Declared Byzantine workers f (the rule's parameter)."),
    byzantine_real: Optional[int] = typer.Option(None, "--byzantine-real", help="Real Byzantine workers [default: f; 0 with --attack none]."),
    batch_size: int = typer.Option(50, "--batch-size", help="Mini-batch size b of each honest worker."),
    steps: int = typer.Option(1000, "--steps", help="Number of training steps."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate [default: the model's, 2 for logit and cnn]."),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="Server momentum (SGD, dampening 0) [default: the model's, 0.99]."),
    eval_every: int = typer.Option(50, "--eval-every", help="Evaluate on the whole test split every this many steps (and at the last); 0 = only at the end."),
    gar: str = typer.Option("average", "--gar", help="Aggregation rule with parameters, e.g. mda, 'multi-krum(m=4)', 'bucketing(s=2)+krum'."),
    attack: str = typer.Option("none", "--attack", help="Attack with parameters, e.g. none, 'little(factor=1.5,negative=true)', 'empire(factor=1.1)'."),
    epsilon: str = typer.Option("none", "--epsilon", help="Gaussian-mechanism epsilon in (0, 1); 'none' = no noise."),
    delta: float = typer.Option(1e-6, "--delta", help="Gaussian-mechanism delta in (0, 1)."),
    clip: Optional[str] = typer.Option(None, "--clip", help="Clipping norm C; 'none' disables clipping [default: the model's, 0.01]."),
    clip_mode: str = typer.Option("batch", "--clip-mode", help="Clip each worker's mini-batch gradient (batch, the study's) or each example (per-example, DP-SGD)."),
    sparsify: str = typer.Option("none", "--sparsify", help="Zero this fraction of smallest-magnitude coordinates (per sign), e.g. 0.25; 'none'. With --epsilon too, it sparsifies the noised gradient (order: clip, noise, sparsify, quantize), which keeps the noise's (epsilon, delta) guarantee."),
    quantize: str = typer.Option("none", "--quantize", help="Quantizer: none, 'uniform(bits=8)', 'stochastic(bits=4)', 'sign', 'qsgd(levels=16)', 'fp16', 'bf16', 'log2(bits=4,rounding=nearest)', 'kmeans(levels=16,iterations=20)', 'fixed(int_bits=3,frac_bits=12,rounding=nearest)' (rounding: nearest or stochastic)."),
    partition: str = typer.Option("iid", "--partition", help=_PARTITION_HELP),
    worker_momentum: float = typer.Option(0.0, "--worker-momentum", help="Honest workers' momentum beta (worker momentum as in Karimireddy, He, Jaggi 2022, arXiv 2006.09365); 0 = none."),
    system: str = typer.Option("server", "--system", help=_SYSTEM_HELP),
    network: str = typer.Option("ideal", "--network", help=_NETWORK_HELP),
    staleness: int = typer.Option(0, "--staleness", help="Bounded staleness tau: each honest gradient is computed on the model of tau_i steps ago, tau_i uniform in 0..tau per worker and step (with --system server or guanyu); 0 = synchronous."),
    seed: str = typer.Option("1", "--seed", help="Seed of every random stream of the run; several seeds run in one process, one file each: '1-5', '1,2,3', '1-3,7'."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:<i>."),
    data_dir: Path = typer.Option(Path("data"), "--data-dir", help="Where datasets are cached (see 'dpbr data fetch')."),
    out: Optional[str] = typer.Option(None, "--out", help="Output Parquet file; '{seed}' in it is replaced by the seed (required with several seeds) [default: results/train/<cell id>.parquet]."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS, help="Torch CPU threads [default: torch's]."),
    grad_strategy: str = typer.Option("auto", "--grad-strategy", help="How honest gradients are computed: auto, closed-form (logit), loop, vmap."),
    chunk: int = typer.Option(64, "--chunk", help="Examples per chunk of per-example gradients (memory bound)."),
    checkpoint_steps: Optional[str] = typer.Option(None, "--checkpoint-steps", help="Save parameters at these steps, e.g. '0,500,1000' (for dpbr vn / reconstruct)."),
    checkpoint_dir: Optional[str] = typer.Option(None, "--checkpoint-dir", help="Folder of checkpoints; '{seed}' is replaced by the seed (required with several seeds) [default: <out without .parquet>.ckpt]."),
    batch: str = typer.Option("auto", "--batch", help="Several seeds: auto (one batched simulation where the engine supports the cell), on (always batched), off (one seed after another)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    """Run one simulated parameter-server cell on real data and write one Parquet row per step (one file per seed)."""
    from dpbr.jobs.bundles import BATCH_MODES, CellJob, parse_seeds, seed_path
    from dpbr.spec import RunSpec

    seeds = parse_seeds(seed, "--seed")
    several = len(seeds) > 1
    if batch not in BATCH_MODES:
        raise UsageError("--batch", f"unknown mode {batch!r}; allowed: {', '.join(BATCH_MODES)}")
    options: dict[str, Any] = dict(
        dataset=dataset, model=model, workers=workers, byzantine=byzantine, batch_size=batch_size, steps=steps,
        eval_every=eval_every, gar=gar, attack=attack, epsilon=epsilon, delta=delta, clip_mode=clip_mode,
        sparsify=sparsify, quantize=quantize, partition=partition, worker_momentum=worker_momentum,
        system=system, network=network, staleness=staleness,
    )
    for key, value in (("byzantine_real", byzantine_real), ("lr", lr), ("momentum", momentum), ("clip", clip)):
        if value is not None:
            options[key] = value
    specs = [RunSpec.create(**options, seed=s) for s in seeds]  # before importing torch: a bad option is reported at once
    ckpts = _steps_list(checkpoint_steps, "--checkpoint-steps")
    cells = [CellJob(spec, seed_path(out, spec.seed, several, "--out") or spec.path("results"), ckpts,
                     seed_path(checkpoint_dir, spec.seed, several and bool(ckpts), "--checkpoint-dir"))
             for spec in specs]
    from dpbr.jobs.train import train, train_many  # torch: after the options are checked

    spec = specs[0]
    shown = f" seeds {seed}" if several else ""
    system = "" if spec.system == "server" else f" {spec.system}"
    update, close = make_progress(f"train {spec.gar}/{spec.attack}{system} b={spec.batch_size}{shown}",
                                  spec.steps * len(specs), quiet)
    try:
        if not several:
            paths = [train(spec, out=cells[0].out, data_dir=data_dir, device=device, threads=threads,
                           strategy=grad_strategy, chunk=chunk, checkpoint_steps=ckpts,
                           checkpoint_dir=cells[0].checkpoint_dir, progress=update)]
        else:
            report = train_many(cells, data_dir=data_dir, device=device, threads=threads, strategy=grad_strategy,
                                chunk=chunk, batch=batch, progress=update, keep_going=False)
            paths = report.paths
    finally:
        close()
    if not quiet:
        for path in paths:
            print(f"wrote {path}", file=sys.stderr)


@app.command("train-many")
def train_many_cmd(
    cells_file: str = typer.Argument(..., metavar="CELLS", help="YAML (or JSON) list of cells, '-' = standard input: each a mapping of train options as in the workflow's train grid (gar, epsilon, batch_size, seed, ...) and optionally out, checkpoint_steps, checkpoint_dir."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:<i>."),
    data_dir: Path = typer.Option(Path("data"), "--data-dir", help="Where datasets are cached (see 'dpbr data fetch')."),
    root: Path = typer.Option(Path("results"), "--root", help="Results folder of cells without 'out' (<root>/train/<cell id>.parquet)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS, help="Torch CPU threads [default: torch's]."),
    grad_strategy: str = typer.Option("auto", "--grad-strategy", help="How honest gradients are computed: auto, closed-form (logit), loop, vmap."),
    chunk: int = typer.Option(64, "--chunk", help="Examples per chunk of per-example gradients (memory bound)."),
    batch: str = typer.Option("auto", "--batch", help="auto (compatible cells as one batched simulation where the engine supports them), on (always batched), off (one cell after another)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    """Run a list of training cells in one process (compatible ones batched) and write one Parquet file per cell.

    Every cell is checked before the first runs (nothing is written if one is wrong). A cell whose run
    fails does not stop the others: their files are written, then the command exits with code 1 and
    one line naming the failed cell.
    """
    from dpbr.jobs.bundles import read_cells

    cells = read_cells(cells_file, root)
    from dpbr.jobs.train import train_many  # torch: after the cells are checked

    update, close = make_progress(f"train-many {len(cells)} cells", sum(c.spec.steps for c in cells), quiet)
    try:
        report = train_many(cells, data_dir=data_dir, device=device, threads=threads, strategy=grad_strategy,
                            chunk=chunk, batch=batch, progress=update)
    finally:
        close()
    if not quiet:
        for path in report.paths:
            if path is not None:
                print(f"wrote {path}", file=sys.stderr)
    if report.failures:
        print(f"dpbr: error: {report.summary(cells)}", file=sys.stderr)
        raise typer.Exit(1)


# ----------------------------------------------------------------------------------------------- #
# dpbr data


@data_app.command("fetch")
def data_fetch_cmd(
    name: str = typer.Argument(..., help="Dataset name: mnist, fashion-mnist, cifar10, cifar100, phishing."),
    data_dir: Path = typer.Option(Path("data"), "--data-dir", help="Cache folder."),
    source: Optional[Path] = typer.Option(None, "--from", help="Import this local copy instead of downloading (verified the same way)."),
) -> None:
    """Download (or import with --from), verify and cache a dataset."""
    from dpbr.jobs.data import fetch

    path = fetch(name, data_dir, source=source)
    print(path)


# ----------------------------------------------------------------------------------------------- #
# dpbr vn: the VN ratio of the honest gradients


def _value_list(text: Optional[str], option: str) -> list[Optional[str]]:
    """``"10,50,100"`` → ``["10", "50", "100"]``; ``none``/empty entries → ``None`` (values are validated by the spec)."""
    if text is None:
        return [None]
    parts = [t.strip() for t in str(text).replace(";", ",").split(",")]
    if not any(parts):
        raise UsageError(option, "expected one value or a comma-separated list")
    return [None if p.lower() in ("", "none", "null", "inf") else p for p in parts]


def _checkpoint_list(values: list[str]) -> list[str]:
    """Each ``--checkpoint`` value is ``init``, an existing path (commas allowed: cell ids contain them)
    or a comma-separated list of those."""
    out: list[str] = []
    for value in values:
        text = value.strip()
        if text.lower() == "init" or Path(text).exists():
            out.append(text)
        else:
            out.extend(t for t in (p.strip() for p in text.split(",")) if t)
    return out


@app.command("vn")
def vn_cmd(
    checkpoint: list[str] = typer.Option(["init"], "--checkpoint", help="Parameters: 'init' (the model's initial parameters for --seed), a checkpoint file of 'dpbr train --checkpoint-steps', or their folder (a trajectory); repeat the option (or separate with commas) for several."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset [default: the checkpoint's; mnist for init]."),
    model: Optional[str] = typer.Option(None, "--model", help="Model [default: the checkpoint's; cnn for init]."),
    run: Optional[str] = typer.Option(None, "--run", help="Check that the checkpoint comes from this training run id (12 hex digits) or 'init'."),
    step: Optional[int] = typer.Option(None, "--step", help="Check that the checkpoint is at this step."),
    batch_size: str = typer.Option("50", "--batch-size", help="Batch size(s) b, e.g. '10,25,50,100,250,500'."),
    epsilon: str = typer.Option("none", "--epsilon", help="Gaussian-mechanism epsilon(s) in (0, 1), e.g. 'none,0.1,0.2,0.5'."),
    delta: float = typer.Option(1e-6, "--delta", help="Gaussian-mechanism delta in (0, 1)."),
    clip: Optional[str] = typer.Option(None, "--clip", help="Clipping norm C; 'none' disables clipping [default: the model's, 0.01]."),
    clip_mode: str = typer.Option("batch", "--clip-mode", help="Clip each mini-batch gradient (batch, the study's) or each example (per-example)."),
    sparsify: str = typer.Option("none", "--sparsify", help="Sparsification fraction(s), e.g. 'none,0.25'; combined with an --epsilon value, the noised gradient is sparsified (clip, noise, sparsify)."),
    workers: int = typer.Option(11, "--workers", help="n at which the rules' bounds k_F(n, f) are evaluated."),
    byzantine: int = typer.Option(5, "--byzantine", help="f at which the rules' bounds k_F(n, f) are evaluated."),
    samples: int = typer.Option(64, "--samples", help="K independent mini-batch gradients per batch size."),
    reference: int = typer.Option(0, "--reference", help="Examples in the reference (large-batch) gradient; 0 = the whole training split."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples of the percentile interval (0 = none)."),
    confidence: float = typer.Option(0.95, "--confidence", help="Level of the interval."),
    seed: int = typer.Option(1, "--seed", help="Seed of the initial parameters, mini-batches, noise and bootstrap."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:<i>."),
    data_dir: Path = typer.Option(Path("data"), "--data-dir", help="Where datasets are cached (see 'dpbr data fetch')."),
    out: Optional[Path] = typer.Option(None, "--out", help="One Parquet with every row [default: one file per cell under --root]."),
    root: Path = typer.Option(Path("results"), "--root", help="Results folder for per-cell files (<root>/vn/<cell id>.parquet)."),
    min_b_out: Optional[Path] = typer.Option(None, "--min-b-out", help="Also write the minimal-batch-size table (Parquet)."),
    eta_out: Optional[Path] = typer.Option(None, "--eta-out", help="Also write the eta-approximated condition table over the checkpoints (Parquet)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS, help="Torch CPU threads [default: torch's]."),
    grad_strategy: str = typer.Option("auto", "--grad-strategy", help="How the K mini-batch gradients are computed: auto, vmap (batched), loop."),
    chunk: Optional[int] = typer.Option(None, "--chunk", help="Examples per batched gradient call (memory bound) [default: 8192]."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    """Measure the VN ratio (and the rules' conditions) for each batch size, privacy setting and checkpoint."""
    from dpbr.jobs.vn import build_cells, run_vn

    options: dict[str, Any] = dict(
        dataset=dataset, model=model, run=run, step=step, delta=delta, clip_mode=clip_mode, workers=workers,
        byzantine=byzantine, samples=samples, reference=reference, bootstrap=bootstrap, confidence=confidence,
        seed=seed,
    )
    if clip is not None:
        options["clip"] = clip
    sizes = _value_list(batch_size, "--batch-size")
    if None in sizes:
        raise UsageError("--batch-size", "expected positive integers such as '10,50,100'")
    cells = build_cells(
        _checkpoint_list(checkpoint), options, batch_sizes=sizes,
        epsilons=_value_list(epsilon, "--epsilon"), sparsities=_value_list(sparsify, "--sparsify"),
    )
    first = cells[0][2][0]
    update, close = make_progress(f"vn {first.model} on {first.dataset}", len(cells) * len(set(sizes)), quiet)
    try:
        paths = run_vn(cells, data_dir=data_dir, device=device, out=out, root=root, min_b_out=min_b_out,
                       eta_out=eta_out, threads=threads, strategy=grad_strategy, chunk=chunk, progress=update)
    finally:
        close()
    if not quiet:
        shown = paths if len(paths) <= 4 else [*paths[:3], f"... ({len(paths)} files)"]
        for p in shown:
            print(f"wrote {p}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- #
# dpbr reconstruct: gradient inversion


@app.command("reconstruct")
def reconstruct_cmd(
    attack: str = typer.Option("dlg", "--attack", help="dlg (L-BFGS, soft dummy label, squared gradient distance), idlg (label from the last layer's gradient, then DLG on the image), ig (Inverting Gradients: cosine distance + total variation, Adam on the signed gradient, box projection, step decay)."),
    model: str = typer.Option("lenet", "--model", help="Attacked model: lenet (DLG's), cnn (the study's), 'resnet(depth=32,width=10)'."),
    dataset: str = typer.Option("mnist", "--dataset", help="Image dataset: mnist, fashion-mnist, cifar10, cifar100 (where downloadable), synthetic."),
    state: str = typer.Option("initial", "--state", help="Model state: 'initial' (as dpbr train with the same seed starts) or a checkpoint file from 'dpbr train --checkpoint-steps' (…/step=S.pt)."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="Model normalises inputs with the dataset's mean/std, as dpbr train's models do; --no-normalize = DLG's original LeNet on raw [0, 1] pixels (state initial only)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Images in the attacked batch (1 … 1000)."),
    defence: str = typer.Option("none", "--defence", help="Defence applied to the shared gradient (a privacy-mechanism spec): none, 'gaussian(sigma=0.01)', 'gaussian(epsilon=0.2,delta=1e-06,clip=0.01,batch_size=1)', 'sparsify(p=0.2)', 'quantize(bits=8,kind=uniform)', 'quantize(kind=sign)', 'clip(c=1)+gaussian(sigma=0.1)'."),
    epsilon: Optional[str] = typer.Option(None, "--epsilon", help="Instead of --defence, a training privacy setting at the attacked batch size: the Gaussian mechanism's epsilon in (0, 1) (needs --clip; the noise sigma = (2C/b)·sqrt(2 ln(1.25/delta))/epsilon of Guerraoui et al. 2021, arXiv 2102.08166)."),
    delta: Optional[float] = typer.Option(None, "--delta", help="With --epsilon: delta in (0, 1) [default 1e-6]."),
    clip: Optional[str] = typer.Option(None, "--clip", help="With the training privacy options: clip the batch gradient to norm C before the rest [default: no clipping]."),
    clip_mode: Optional[str] = typer.Option(None, "--clip-mode", help="With --clip: batch (the only mode here: the attack sees one batch gradient)."),
    sparsify: Optional[str] = typer.Option(None, "--sparsify", help="Training privacy setting: zero this fraction of smallest-magnitude coordinates, e.g. 0.25."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="Training privacy setting: a quantizer as in dpbr train --quantize, e.g. 'uniform(bits=8)'."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Labels: soft (optimised; dlg), infer (iDLG rule), known [default: soft for dlg, infer for idlg, known for ig]."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="L-BFGS steps (dlg, idlg; one step = one torch.optim.LBFGS.step with max_iter 20) or Adam iterations (ig) [default: 300; ig 4800]."),
    restarts: int = typer.Option(1, "--restarts", help="Independent restarts, optimised together; the one with the smallest final gradient distance is scored."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate: L-BFGS (dlg, idlg) [default 1] or Adam (ig) [default 0.1]."),
    tv: Optional[float] = typer.Option(None, "--tv", help="Total-variation weight [default: 0; ig 1e-4]."),
    seed: int = typer.Option(1, "--seed", help="Seed of the model initialisation, image choice, defence noise and dummy initialisation."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:<i>."),
    data_dir: Path = typer.Option(Path("data"), "--data-dir", help="Where datasets are cached (see 'dpbr data fetch')."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output Parquet file, one row per image: MSE, PSNR, SSIM (standard Gaussian-window SSIM of Wang et al. 2004, 11x11, sigma 1.5 — not CW-SSIM), label correct, success at MSE < 1e-2/1e-3/1e-4 [default: results/reconstruct/<cell id>.parquet]."),
    png: Optional[Path] = typer.Option(None, "--png", help="PNG grid, originals above and matched reconstructions below [default: --out with .png]."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS, help="Torch CPU threads [default: 1 for small problems, else torch's]."),
    strategy: str = typer.Option("auto", "--strategy", help="How restarts are evaluated: auto, loop (autograd per restart), vmap (torch.func, all at once)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    """Reconstruct training images from the gradient a worker shares (DLG, iDLG, Inverting Gradients) and score them."""
    from dpbr.spec import ReconSpec

    spec = ReconSpec.create(attack=attack, model=model, dataset=dataset, normalize=normalize, state=state, batch_size=batch_size,
                            defence=defence, labels=labels, iterations=iterations, restarts=restarts, lr=lr, tv=tv,
                            seed=seed, epsilon=epsilon, delta=delta, clip=clip, clip_mode=clip_mode, sparsify=sparsify,
                            quantize=quantize)
    target = out if out is not None else spec.path("results")
    from dpbr.jobs.reconstruct import reconstruct  # torch: after the options are checked

    update, close = make_progress(f"reconstruct {spec.attack} b={spec.batch_size}", spec.iterations, quiet)
    try:
        path, image = reconstruct(spec, out=target, png=png, data_dir=data_dir, device=device, threads=threads,
                                  strategy=strategy, progress=lambda done, total: update(done, total, None))
    finally:
        close()
    if not quiet:
        print(f"wrote {path} and {image}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- #
# dpbr aggregate / dpbr plot: summaries and figures of the training cells


@app.command("aggregate")
def aggregate_cmd(
    paths: Optional[list[Path]] = typer.Argument(None, help="Cell files or folders searched recursively for *.parquet [default: results/train]."),
    files_from: Optional[str] = typer.Option(None, "--files-from", help="Also read cell file paths, one per line, from this file ('-' = standard input; no length limit)."),
    out_dir: Path = typer.Option(Path("results/summary"), "--out-dir", help="Folder of the summary tables."),
    quiet: bool = typer.Option(False, "--quiet", help="No report of what was written."),
) -> None:
    """Concatenate training cells into metrics.parquet, tabulate final accuracy (mean ± std over seeds, and the
    mean of the last 5 evaluations), the curves, and for selecting rules how often each worker was selected
    (selections.parquet)."""
    from dpbr.report.aggregate import aggregate, find_cell_files, read_file_list

    given: list[str | Path] = list(paths or [])
    if files_from is not None:
        given += read_file_list(files_from)
    if not given:
        given = [Path("results/train")]
    written = aggregate(find_cell_files(given), out_dir)
    if not quiet:
        for path in written.values():
            print(f"wrote {path}", file=sys.stderr)


@app.command("plot")
def plot_cmd(
    summary_dir: Path = typer.Option(Path("results/summary"), "--summary-dir", help="Folder written by 'dpbr aggregate'."),
    out_dir: Path = typer.Option(Path("results/figures"), "--out-dir", help="Figures go to <out-dir>/dataset=<d>,model=<m>/<figure>.<format>."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Only this dataset (canonical name as in the cells) [default: all]."),
    model: Optional[str] = typer.Option(None, "--model", help="Only this model [default: all]."),
    formats: str = typer.Option("html,png,svg", "--formats", help="Comma-separated: html (self-contained, offline), png, svg."),
    quiet: bool = typer.Option(False, "--quiet", help="No report of what was written."),
) -> None:
    """Draw accuracy and loss vs step (rows ε, columns b, colour rule/attack, band ± std) and final accuracy vs b."""
    from dpbr.report.charts import plot

    fmts = [f.strip().lower() for f in formats.split(",") if f.strip()]
    if not fmts:
        raise UsageError("--formats", "expected one or more of html, png, svg")
    written = plot(summary_dir, out_dir, dataset=dataset, model=model, formats=fmts)
    if not quiet:
        print(f"wrote {len(written)} files under {out_dir}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- #
# dpbr vn-report / dpbr reconstruct-report: summaries and figures of the VN and inversion grids


def _report_inputs(paths: Optional[list[Path]], files_from: Optional[str], default: Path) -> list[Path]:
    from dpbr.report.aggregate import find_cell_files, read_file_list

    given: list[str | Path] = list(paths or [])
    if files_from is not None:
        given += read_file_list(files_from)
    return find_cell_files(given or [default])


def _formats(text: str) -> list[str]:
    fmts = [f.strip().lower() for f in text.split(",") if f.strip()]
    if not fmts or any(f not in ("html", "png", "svg") for f in fmts):
        raise UsageError("--formats", f"expected one or more of html, png, svg, got {text!r}")
    return fmts


_FILES_FROM_HELP = "Also read cell file paths, one per line, from this file ('-' = standard input)."
_TRAIN_FINAL_HELP = "Final-accuracy table of the training grid (dpbr aggregate's final_accuracy.parquet) to compare with."


@app.command("vn-report")
def vn_report_cmd(
    paths: Optional[list[Path]] = typer.Argument(None, help="VN cell files or folders of them [default: results/vn]."),
    files_from: Optional[str] = typer.Option(None, "--files-from", help=_FILES_FROM_HELP),
    train_final: Optional[Path] = typer.Option(None, "--train-final", help=_TRAIN_FINAL_HELP),
    summary_dir: Path = typer.Option(Path("results/summary"), "--summary-dir", help="Folder of vn.parquet and vn_min_b.{parquet,csv}."),
    out_dir: Path = typer.Option(Path("results/figures/vn"), "--out-dir", help="Folder of the figures ratio_vs_b and accuracy_vs_ratio."),
    formats: str = typer.Option("html,png,svg", "--formats", help="Comma-separated: html (self-contained, offline), png, svg."),
    quiet: bool = typer.Option(False, "--quiet", help="No report of what was written."),
) -> None:
    """Tabulate VN cells (minimal b per rule next to Table 1) and draw ratio vs b and accuracy vs ratio."""
    from dpbr.report.vn_report import vn_report

    fmts = _formats(formats)
    written = vn_report(_report_inputs(paths, files_from, Path("results/vn")), summary_dir, out_dir,
                        train_final=train_final, formats=fmts)
    if not quiet:
        print(f"wrote {len(written)} files", file=sys.stderr)


@app.command("reconstruct-report")
def reconstruct_report_cmd(
    paths: Optional[list[Path]] = typer.Argument(None, help="Reconstruction cell files or folders [default: results/reconstruct]."),
    files_from: Optional[str] = typer.Option(None, "--files-from", help=_FILES_FROM_HELP),
    train_final: Optional[Path] = typer.Option(None, "--train-final", help=_TRAIN_FINAL_HELP),
    summary_dir: Path = typer.Option(Path("results/summary"), "--summary-dir", help="Folder of reconstruct.parquet and reconstruct_table.{parquet,csv}."),
    out_dir: Path = typer.Option(Path("results/figures/reconstruct"), "--out-dir", help="Folder of the figures psnr_vs_batch, success_vs_batch, privacy_utility."),
    formats: str = typer.Option("html,png,svg", "--formats", help="Comma-separated: html (self-contained, offline), png, svg."),
    quiet: bool = typer.Option(False, "--quiet", help="No report of what was written."),
) -> None:
    """Tabulate reconstruction cells (PSNR, SSIM, success rates over seeds) and draw them per defence."""
    from dpbr.report.inversion_report import reconstruct_report

    fmts = _formats(formats)
    written = reconstruct_report(_report_inputs(paths, files_from, Path("results/reconstruct")), summary_dir, out_dir,
                                 train_final=train_final, formats=fmts)
    if not quiet:
        print(f"wrote {len(written)} files", file=sys.stderr)


@app.command("hetero-report")
def hetero_report_cmd(
    summary_dir: Path = typer.Option(Path("results/summary"), "--summary-dir", help="Folder written by 'dpbr aggregate' (final_accuracy, curves and, when present, selections); bucketing_table.{csv,md} are written there."),
    out_dir: Path = typer.Option(Path("results/figures/hetero"), "--out-dir", help="Folder of the figures bucketing_table, accuracy_by_attack, selections."),
    formats: str = typer.Option("html,png,svg", "--formats", help="Comma-separated: html (self-contained, offline), png, svg."),
    quiet: bool = typer.Option(False, "--quiet", help="No report of what was written."),
) -> None:
    """Tabulate rule × {IID, non-IID} × bucketing s (last-5-evaluation accuracy, mean ± std over seeds) and draw
    accuracy per attack and how often each worker was selected (Karimireddy, He, Jaggi 2022, arXiv 2006.09365)."""
    from dpbr.report.hetero_report import hetero_report

    written = hetero_report(summary_dir, out_dir, formats=_formats(formats))
    if not quiet:
        print(f"wrote {len(written)} files", file=sys.stderr)


@app.command("systems-report")
def systems_report_cmd(
    summary_dir: Path = typer.Option(Path("results/summary"), "--summary-dir", help="Folder written by 'dpbr aggregate' (metrics, final_accuracy); systems_table.{csv,md} and systems_claims.{csv,md} are written there."),
    out_dir: Path = typer.Option(Path("results/figures/systems"), "--out-dir", help="Folder of the figures draco_exact, time_to_accuracy, privacy_vote, servers, costs, lossy, staleness."),
    formats: str = typer.Option("html,png,svg", "--formats", help="Comma-separated: html (self-contained, offline), png, svg."),
    quiet: bool = typer.Option(False, "--quiet", help="No report of what was written."),
) -> None:
    """Tabulate the robust systems (accuracy, costs per step, simulated time) and check their claims against the
    one-server runs: DRACO (Chen et al. 2018, arXiv 1803.09877), GuanYu (El Mhamdi et al. 2019, arXiv 1905.03853),
    LiuBei (El Mhamdi, Guerraoui, Guirguis, PODC 2020), AggregaThor (Damaskinos et al., SysML 2019)."""
    from dpbr.report.systems_report import systems_report

    written = systems_report(summary_dir, out_dir, formats=_formats(formats))
    if not quiet:
        print(f"wrote {len(written)} files", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- #


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``dpbr`` console script: one-line errors with exit code 2."""
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="dpbr", standalone_mode=False)
    except UsageError as exc:
        print(f"dpbr: error: {exc.one_line()}", file=sys.stderr)
        sys.exit(2)
    except _click_exc.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(0)
    except _click_exc.UsageError as exc:
        msg = " ".join(exc.format_message().split())
        print(f"dpbr: error: {msg}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("dpbr: interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:  # a file-system refusal no option check foresaw (disk full, a race): still one line
        where = f"{exc.filename!s}: " if exc.filename else ""
        print(f"dpbr: error: {where}{exc.strerror or ' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(2)
    if isinstance(rv, int) and rv != 0:
        sys.exit(rv)


if __name__ == "__main__":  # pragma: no cover
    main()
