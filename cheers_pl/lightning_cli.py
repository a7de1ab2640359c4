"""``cheers fit | validate | test | predict``: the Lightning CLI over the stage modules and the DataModule.

YAML experiments are LightningCLI configs (``experiments/``). The parser runs in ``omegaconf+``
mode, so ``${trainer.default_root_dir}``-style references are resolved after every config file
and command-line override is merged: an overlay or ``--trainer.default_root_dir`` moves the
logs, checkpoints and stage hand-off paths together. The resolved config is saved beside the
logs (``config.yaml``) and reruns as it is.

A bad config fails before any weight is allocated or any data is read: jsonargparse refuses
unknown keys and wrong types while parsing (the message here adds the valid keys and the
nearest ones); the stage module and the DataModule check their values, sizes, modes and
ratios in ``__init__``, and that error is raised as it is, not inside jsonargparse's union
report. Checkpoints (``--ckpt_path``) load with ``weights_only=True`` only, their integrity
hash checked (:mod:`cheers_pl.io.integrity`).

Resuming (:mod:`cheers_pl.io.resume`): ``--ckpt_path last`` with no ``last.ckpt`` is refused
naming the folder searched (``--ckpt_path auto``: resume when there is one, else start fresh);
a checkpoint of another stage, spec or data tasks than the config is refused naming both
(``--allow_stage_switch true`` resumes it under the config's stage, spec and data); a resumed
run does not load ``init_from`` (the checkpoint's weights replace it). A missing ``init_from``
names the ``make`` target that writes it; ``data.image_size`` must match the model's. ``fit``
holds the run folder's lock (:mod:`cheers_pl.io.run_lock`): a second fit in the same
``default_root_dir`` is refused naming the first one's pid. ``run_folder: versioned`` (the stage
YAMLs): each fresh fit writes into its own ``run-*`` folder of the stage folder and ``latest``
names the last finished run (:mod:`cheers_pl.io.run_folder`); ``preset`` names the
``runs/<preset>`` the stage YAMLs write under.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import warnings
from importlib import import_module
from pathlib import Path
from typing import Any, Literal, NoReturn

import jsonargparse
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from cheers_pl.data.datamodule import CheersDataModule
from cheers_pl.io import resume, run_folder
from cheers_pl.io.checkpoint_io import DiskFullError
from cheers_pl.io.integrity import CheckpointCorruptError
from cheers_pl.io.run_lock import RunFolderBusy, RunLock, is_launching_process
from cheers_pl.io.sharded import is_sharded_checkpoint
from cheers_pl.stages.base import CheersModule
from cheers_pl.stages.weights import missing_init_from_message

SUBCOMMANDS = ("fit", "validate", "test", "predict")
_UNION = "Does not validate against any of the Union subtypes"
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)':")
_UNKNOWN = [
    re.compile(r"Subcommand '(?P<sub>[^']+)' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"Group '(?P<group>[^']+)' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"Option '(?P<key>[^']+)' is not accepted"),
]


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(import_module(module), name)


def _class_keys(class_path: str) -> list[str]:
    """The keys jsonargparse accepts for ``class_path`` (``init_args`` names, nested groups dotted)."""
    try:
        parser = jsonargparse.ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(_import(class_path), fail_untyped=False)
    except Exception:  # only a hint: an unimportable class gets none
        return []
    return sorted(a.dest for a in parser._actions if a.dest != "help" and not a.dest.endswith(".help"))


def _level(keys: list[str], prefix: str) -> list[str]:
    """The keys one level below ``prefix`` ("" for the top level)."""
    cut = len(prefix) + 1 if prefix else 0
    return sorted({k[cut:].split(".")[0] for k in keys if not prefix or k.startswith(prefix + ".")})


def _suggest(key: str, prefix: str, valid: list[str], where: str) -> str:
    """``hint: 'lr_typo' is not a key of X; did you mean 'lr'? Valid keys are [...]``."""
    leaf = key.rpartition(".")[2] if prefix else key
    near = [f"{prefix}.{v}" if prefix else v for v in difflib.get_close_matches(leaf, valid, n=3, cutoff=0.6)]
    text = f"hint: {key!r} is not a key of {where}"
    text += f"; did you mean {' or '.join(map(repr, near))}?" if near else "."
    return text + f" Valid keys{f' of {prefix!r}' if prefix else ''} are {valid}"


def stage_classes() -> list[str]:
    """The class paths a ``model: class_path:`` may name."""
    from cheers_pl.stages import STAGES

    return [f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}" for cls in STAGES.values()]


def config_hints(message: str, ex: Exception | None = None) -> list[str]:
    """Hints for a jsonargparse error: the valid keys near an unknown one, the valid stage classes."""
    hints = []
    for pattern in _UNKNOWN:
        for m in pattern.finditer(message):
            key, found = m.group("key"), m.groupdict()
            if found.get("sub"):  # a key of the subcommand's own parser: trainer.*, data.*, ...
                sub = getattr(ex, "subcommand_parser", None)
                keys = [a.dest for a in getattr(sub, "_actions", ()) if a.dest != "help"]
                prefix = key.rpartition(".")[0]
                where = f"`cheers {found['sub']}`"
            else:  # a key of a class given by class_path (the stage, the spec, a callback, ...)
                before = _CLASS_PATH.findall(message[: m.start()])
                keys = _class_keys(before[-1]) if before else []
                prefix = found.get("group") or ""
                where = before[-1] if before else ""
                key = f"{prefix}.{key}" if prefix else key
            valid = _level(keys, prefix)
            if valid:
                hints.append(_suggest(key, prefix, valid, where))
    model = re.search(r"(?s)Parser key \"model\":.*?Problem with given class_path '([^']+)'", message)
    if model:
        try:
            is_stage = issubclass(_import(model.group(1)), CheersModule)
        except Exception:
            is_stage = False
        if not is_stage:
            hints.append(f"hint: model class_path {model.group(1)!r}: valid stages are {stage_classes()}")
    return list(dict.fromkeys(hints))


class CheersArgumentParser(LightningArgumentParser):
    """The CLI's parser: its errors also name the valid keys (or stages) near a wrong one."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        hints = [h for h in config_hints(message, ex) if h not in message]  # nested parsers add theirs
        super().error("\n".join([message, *hints]), ex)


def _unwrap(err: BaseException) -> BaseException:
    """The error a class's ``__init__`` raised, out of jsonargparse's "no Union subtype fits" wrappers."""
    while isinstance(err, ValueError) and str(err).startswith(_UNION) and err.__cause__ is not None:
        err = err.__cause__
    return err


class CheersCLI(LightningCLI):
    """LightningCLI with config errors that name the key and the valid choices, checked resumes
    and a run-folder lock (module docstring)."""

    def __init__(self, *args, **kwargs):
        self._lock: RunLock | None = None
        self._run: tuple[Path, Path] | None = None  # (stage folder, run folder) of a versioned fit
        self._run_note: tuple[bool, str] = (False, "")  # (resumed, the line saying which folder)
        self._run_started = False
        try:
            super().__init__(*args, **kwargs)
        except BaseException as err:
            self._end_run(err)
            raise
        else:
            self._end_run(None)
        finally:
            if self._lock is not None:
                self._lock.release()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--preset",
            type=str,
            default="paper",
            help="the run's preset name: the stage YAMLs write under runs/${preset}/stageN "
            "(experiments/tiny.yaml sets tiny)",
        )
        parser.add_argument(
            "--run_folder",
            type=Literal[run_folder.MODES],
            default="fixed",
            help="versioned: trainer.default_root_dir is the stage folder, each fresh fit writes into "
            "a run-<time> folder of it and 'latest' names the last finished run (the stage YAMLs set "
            "this); fixed: everything directly in default_root_dir (Lightning's own behaviour)",
        )
        parser.add_argument(
            "--allow_stage_switch",
            type=bool,
            default=False,
            help="resume a --ckpt_path of another stage, spec or data tasks than the config, under the "
            "config's (by default such a checkpoint is refused, naming both)",
        )

    def _parse_ckpt_path(self) -> None:
        """Resolve ``last`` / ``auto``, refuse a checkpoint that disagrees with the config, then
        merge its hyperparameters as LightningCLI does (not when switching stage), and drop
        ``init_from`` (the resumed weights replace it)."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
        try:
            versioned = cfg.get("run_folder") == "versioned" and not run_folder.needs_shared_id()
            path, note = resume.resolve_ckpt_path(cfg.get("ckpt_path"), cfg.get("trainer"), versioned)
        except FileNotFoundError as err:
            self.parser.error(f"{sub}: {err}")
        cfg.ckpt_path = path
        if note:
            print(f"cheers {sub}: {note}", file=sys.stderr)
        if path is None or path in ("best", "hpc") or "://" in str(path):
            return
        if not (Path(path).is_file() or is_sharded_checkpoint(path)):
            self.parser.error(f"{sub}: --ckpt_path {path}: no checkpoint there (no file, no sharded folder)")
        try:
            info = resume.read_resume_info(path)
        except CheckpointCorruptError as err:
            self.parser.error(f"{sub}: {err}")
        found = resume.disagreements(info, cfg.get("model"), cfg.get("data"))
        if found and not cfg.get("allow_stage_switch"):
            self.parser.error(f"{sub}: {resume.mismatch_message(path, found)}")
        if found:
            switch = "; ".join(found)
            print(f"cheers {sub}: --allow_stage_switch: {switch}; the config's win", file=sys.stderr)
        elif Path(path).is_file():
            self._merge_hparams(sub, info["hparams"])
        init_args = self.config[sub].model.get("init_args")
        if init_args is not None and init_args.get("init_from"):
            print(
                f"cheers {sub}: resuming {path}: init_from {init_args.init_from} is not loaded "
                "(the checkpoint's weights replace it)",
                file=sys.stderr,
            )
            init_args.init_from = None

    def _merge_hparams(self, sub: str, hparams: dict) -> None:
        """LightningCLI's merge of a checkpoint's hyperparameters into the config (``_parse_ckpt_path``)."""
        hparams = dict(hparams)
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        if sub:
            self._check_init_from(sub)
            self._check_component_paths(sub)
        if sub == "fit":
            self._choose_run_folder()
        if sub and "weights_only" in self.config[sub]:
            if self.config[sub]["weights_only"] is False:
                self.parser.error(
                    f"{sub}: weights_only=false is refused: checkpoints load with weights_only=True only "
                    "(a pickled object in a checkpoint can run code); valid choices are [true, null]"
                )
            self.config[sub]["weights_only"] = True

    def _choose_run_folder(self) -> None:
        """Take the stage folder's lock and, with ``run_folder: versioned``, move the run's paths
        into its run folder (:mod:`cheers_pl.io.run_folder`)."""
        cfg = self.config["fit"]
        root = cfg.trainer.get("default_root_dir") or os.getcwd()
        versioned = cfg.get("run_folder") == "versioned"
        if versioned and run_folder.needs_shared_id():
            versioned = False
            if is_launching_process():
                print(
                    f"cheers fit: run_folder versioned needs an id all ranks share (SLURM_JOB_ID, torchrun "
                    f"--rdzv-id or {run_folder.RUN_DIR_ENV}); writing into {root} itself",
                    file=sys.stderr,
                )
        if is_launching_process():
            try:
                folder = run_folder.stage_folder(root) if versioned else root
                self._lock = RunLock(folder, "cheers fit").acquire()
            except RunFolderBusy as err:
                raise SystemExit(f"cheers fit: {err}") from None
        if not versioned:
            return
        stage, run, resumed, note = run_folder.choose_run_folder(root, cfg.get("ckpt_path"))
        run_folder.move_paths(cfg, Path(root), run)
        cfg.trainer.default_root_dir = str(run)
        self._run, self._run_note = (stage, run), (resumed, note)

    def before_fit(self) -> None:
        """Create the run folder only now: a refusal while the classes are built leaves none."""
        if self._run is None:
            return
        if is_launching_process():
            resumed, note = self._run_note
            run_folder.start(*self._run, resumed)
            print(f"cheers fit: {note}", file=sys.stderr)
        self._run_started = True

    def _end_run(self, error: BaseException | None) -> None:
        """After a versioned fit: ``latest`` -> the run when it finished, else keep (or, when it took
        no step, remove) its folder; one line either way."""
        if self._run is None:
            return
        stage, run = self._run
        self._run = None
        run_folder.end()
        if not is_launching_process() or not self._run_started:
            return
        trainer = getattr(self, "trainer", None)
        step = int(getattr(trainer, "global_step", 0) or 0)
        if error is None and trainer is not None and trainer.state.finished:
            line = run_folder.finish(stage, run, step)
        else:
            line = run_folder.fail(run, step, error or RuntimeError("the fit did not finish"))
        print(f"cheers fit: {line}", file=sys.stderr)

    def _check_init_from(self, sub: str) -> None:
        model = self.config[sub].get("model")
        init_from = model.get("init_args", {}).get("init_from") if model is not None else None
        if init_from:
            init_from = os.path.normpath(init_from)
            if not Path(init_from).exists():  # a file, a sharded checkpoint, an exported / converted folder
                self.parser.error(f"{sub}: {missing_init_from_message(init_from, model.get('class_path'))}")

    def _check_component_paths(self, sub: str) -> None:
        """Every ``flavor: pretrained`` folder of the spec must exist: one error names them all,
        their public sources and ``cheers prepare`` (before any weight is built)."""
        from cheers_pl.io.paper_layout import missing_component_paths, missing_message

        model = self.config[sub].get("model")
        spec = model.get("init_args", {}).get("spec") if model is not None else None
        missing = missing_component_paths(vars(spec) if isinstance(spec, jsonargparse.Namespace) else spec)
        if missing:
            self.parser.error(f"{sub}: {missing_message(missing)}")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            inner = _unwrap(err)
            if inner is err:
                raise
            raise inner from None
        self._check_image_size()

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        """Lightning's, with :class:`~cheers_pl.callbacks.progress.CheersProgressBar` and
        :class:`~cheers_pl.callbacks.progress.ThroughputLog` added unless the config has its own."""
        bar = config.get("enable_progress_bar") is not False
        config["callbacks"] = _with_kit_callbacks(list(config.get("callbacks") or []), bar)
        return super()._instantiate_trainer(config, callbacks)

    def _check_image_size(self) -> None:
        """``data.image_size``, when set, must be the model's (it fails at the first step otherwise)."""
        data_size = getattr(self.datamodule, "image_size", None)
        model_size = getattr(self.model, "image_size", None)
        if data_size is not None and model_size is not None and data_size != model_size:
            self.parser.error(
                f"data.image_size={data_size} but the model's image size is {model_size} (from its spec: "
                "the semantic encoder's and the VAE's sizes); drop data.image_size (it is taken from the "
                f"model) or set it to {model_size}"
            )


def _with_kit_callbacks(callbacks: list, progress_bar: bool = True) -> list:
    """``callbacks`` plus the kit's progress bar (when ``progress_bar``: the trainer's
    ``enable_progress_bar``) and throughput line, unless the config has its own."""
    from lightning.pytorch.callbacks import ProgressBar

    from cheers_pl.callbacks.progress import CheersProgressBar, ThroughputLog

    has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
    extra = [] if has_bar or not progress_bar else [CheersProgressBar()]
    extra += [] if any(isinstance(c, ThroughputLog) for c in callbacks) else [ThroughputLog()]
    return [*callbacks, *extra]


def run(argv: list[str]) -> LightningCLI:
    """Run LightningCLI on ``argv`` (starting with a subcommand)."""
    jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    # argv is given, and LightningCLI warns that sys.argv holds arguments too; sys.argv must stay
    # whole all the same: Lightning's launcher starts ranks 1..N-1 by re-running it (issue 14, item 11)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return CheersCLI(
        CheersModule,
        CheersDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf+"},
        parser_class=CheersArgumentParser,
        args=argv,
    )


def main(argv: list[str]) -> int:
    """``cheers fit ...`` etc.: ``argv`` starts with the subcommand. A full disk while saving ends
    with one line (:class:`~cheers_pl.io.checkpoint_io.DiskFullError`), exit code 1."""
    try:
        run(argv)
    except DiskFullError as err:
        print(f"cheers {argv[0] if argv else ''}: {err}", file=sys.stderr)
        return 1
    return 0
