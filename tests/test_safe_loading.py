"""Safe loading: no code runs from a model, checkpoint or data file, and recipes stay inside their roots.

* a static scan of the kit's sources: every ``torch.load`` passes ``weights_only=True``, nothing
  names ``trust_remote_code``, nothing unpickles (``pickle.load``, ``numpy.load(allow_pickle=True)``,
  ``yaml.unsafe_load``, ...);
* a checkpoint holding a pickled object whose unpickling would run code is refused by every
  loader of the kit, and the code does not run;
* exports are safetensors, never pickles;
* a recipe's image path that leaves its root (``..``, absolute, a symbolic link) is refused.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("cheers_pl", "data_recipes", "benchmarks")
EXPERIMENTS = ROOT / "experiments"


# -- static scan -----------------------------------------------------------------------------------
def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}
LOADERS = {"load", "loads", "Unpickler", "open"}  # pickle.UnpicklingError and pickle.dumps are fine
BANNED_CALLS = {
    "torch.hub.load": "runs a repository's hubconf.py",
    "torch.hub.load_state_dict_from_url": "downloads and unpickles",
    "pandas.read_pickle": "unpickles",
    "pd.read_pickle": "unpickles",
    "yaml.unsafe_load": "builds arbitrary objects",
    "yaml.full_load": "builds arbitrary objects",
    "torch.jit.load": "loads code",
}


def unsafe_loads(source: str, name: str = "<source>") -> list[str]:
    """Every unsafe loading construct in ``source``: ``name:line: what``."""
    tree = ast.parse(source)
    torch_load = {"torch.load", "torch.serialization.load"}
    problems = []

    def bad(node: ast.AST, what: str) -> None:
        problems.append(f"{name}:{node.lineno}: {what}")

    unpicklers = set()  # names bound to a pickle-like module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            unpicklers |= {a.asname or a.name for a in node.names if a.name.split(".")[0] in UNPICKLERS}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in torch_load:
                    torch_load.add(alias.asname or alias.name)
                if node.module.split(".")[0] in UNPICKLERS and alias.name in LOADERS:
                    bad(node, f"imports {full}: unpickling runs code")
        elif isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
            bad(node.value, "trust_remote_code= runs code shipped with a model")
        elif isinstance(node, ast.Constant) and node.value == "trust_remote_code":
            bad(node, "'trust_remote_code' runs code shipped with a model")
        elif isinstance(node, ast.Name) and node.id == "trust_remote_code":
            bad(node, "trust_remote_code runs code shipped with a model")
        elif isinstance(node, ast.Attribute) and node.attr in LOADERS and _dotted(node.value) in unpicklers:
            bad(node, f"{_dotted(node)}: unpickling runs code")
        if not isinstance(node, ast.Call):
            continue
        func = _dotted(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        if func in torch_load:
            flag = kw.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                bad(node, f"{func}(...) without a literal weights_only=True")
        elif func in BANNED_CALLS:
            bad(node, f"{func}(...) {BANNED_CALLS[func]}")
        elif func.endswith(("np.load", "numpy.load")):
            flag = kw.get("allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                bad(node, f"{func}(allow_pickle=...) unpickles")
        elif func == "yaml.load":
            loader = _dotted(kw["Loader"]) if "Loader" in kw else ""
            if not loader.endswith(("SafeLoader", "CSafeLoader")):
                bad(node, "yaml.load without Loader=yaml.SafeLoader builds arbitrary objects")
        elif func.endswith("from_pretrained"):
            flag = kw.get("use_safetensors")
            if isinstance(flag, ast.Constant) and flag.value is False:
                bad(node, f"{func}(use_safetensors=False) loads pickled weights")
    return problems


def kit_sources() -> list[Path]:
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))


def test_the_kit_has_no_unsafe_loading():
    files = kit_sources()
    assert len(files) > 50 and any(p.parts[-2] == "benchmarks" for p in files)
    problems = [msg for p in files for msg in unsafe_loads(p.read_text(), str(p.relative_to(ROOT)))]
    assert not problems, "\n".join(problems)


def test_every_torch_load_in_the_kit_is_found_by_the_scan():
    """The scan sees the loads the kit has (so a refactor that hides them from it fails here)."""
    found = [
        p.name
        for p in kit_sources()
        if "weights_only=True" in p.read_text() and "torch.load(" in p.read_text()
    ]
    assert {"integrity.py", "export.py"} <= set(found)  # integrity.load_checked: --ckpt_path, init_from


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.load(p)",
        "import torch\ntorch.load(p, weights_only=False)",
        "import torch\ntorch.load(p, weights_only=flag)",
        "import torch\ntorch.load(p, **kw)",
        "from torch import load as L\nL(p)",
        "import torch\ntorch.serialization.load(p, map_location='cpu')",
        "AutoModel.from_pretrained(p, trust_remote_code=True)",
        "AutoModel.from_pretrained(p, **{'trust_remote_code': True})",
        "AutoModel.from_pretrained(p, use_safetensors=False)",
        "import pickle\npickle.loads(b)",
        "from pickle import load",
        "import pickle as p\nu = p.Unpickler(f)",
        "import joblib\njoblib.load(p)",
        "import numpy as np\nnp.load(p, allow_pickle=True)",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
        "import yaml\nyaml.unsafe_load(text)",
        "import torch\ntorch.hub.load('repo', 'model')",
    ],
)
def test_the_scan_catches_unsafe_loading(source):
    assert unsafe_loads(source)


def test_the_scan_passes_safe_loading():
    safe = (
        "import torch, yaml, numpy as np\ntorch.load(p, map_location='cpu', weights_only=True)\n"
        "yaml.safe_load(t)\nyaml.load(t, Loader=yaml.SafeLoader)\nnp.load(p)\nM.from_pretrained(p)\n"
        "import pickle\ntry:\n    pass\nexcept pickle.UnpicklingError:\n    pass\n"
    )
    assert unsafe_loads(safe) == []


# -- a checkpoint that would run code -------------------------------------------------------------
def _touch(path: str) -> None:
    Path(path).write_text("code from a checkpoint ran")


class Payload:
    """Unpickling this calls ``_touch(marker)``: a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _touch, (self.marker,)


@pytest.fixture
def evil(tmp_path, model_state):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    spec = {"payload": Payload(marker)}
    torch.save(
        {"state_dict": model_state, "hyper_parameters": {"spec": spec}, "extra": Payload(marker)}, path
    )
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: a plain unpickle runs it
    assert marker.exists()
    marker.unlink()
    return path, marker


@pytest.fixture(scope="module")
def model_state():
    return {"model.x": torch.zeros(2)}


def test_load_any_refuses_a_checkpoint_with_code(evil):
    from cheers_pl.io.export import load_any

    path, marker = evil
    with pytest.raises(
        ValueError, match=r"evil.ckpt cannot be read as a checkpoint.*Weights only load failed"
    ):
        load_any(path)
    assert not marker.exists()


def test_read_state_dict_refuses_a_checkpoint_with_code(evil):
    import pickle

    from cheers_pl.stages.weights import read_state_dict

    path, marker = evil
    with pytest.raises((ValueError, pickle.UnpicklingError), match="Weights only load failed"):
        read_state_dict(path)
    assert not marker.exists()


def test_a_sharded_checkpoint_with_code_is_refused(tmp_path):
    """An FSDP sharded folder: DCP stores non-tensor values pickled inside the shards."""
    import torch.distributed.checkpoint as dcp

    from cheers_pl.io.sharded import is_sharded_checkpoint
    from cheers_pl.stages.weights import read_state_dict

    marker, folder = tmp_path / "marker", tmp_path / "last.ckpt"
    dcp.save(
        {"model": {"model.x": torch.zeros(2)}, "extra": Payload(marker)}, checkpoint_id=folder, no_dist=True
    )
    torch.save({"global_step": 1, "hyper_parameters": {}}, folder / "meta.pt")
    assert is_sharded_checkpoint(folder)
    with pytest.raises(ValueError, match="'extra' cannot be read with weights_only=True"):
        read_state_dict(folder)
    assert not marker.exists()


def cli(*extra: str, tmp_path: Path) -> None:
    from cheers_pl.cli import main

    args = ["fit", "-c", str(EXPERIMENTS / "stage1_alignment.yaml"), "-c", str(EXPERIMENTS / "tiny.yaml")]
    main([*args, "--trainer.default_root_dir", str(tmp_path / "run"), *extra])


def test_resuming_from_a_checkpoint_with_code_is_refused(evil, tmp_path):
    import pickle

    path, marker = evil
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        cli("--ckpt_path", str(path), tmp_path=tmp_path)
    assert not marker.exists()


def test_cli_runs_load_checkpoints_weights_only(tmp_path, monkeypatch, capsys):
    import lightning.pytorch as pl

    seen = {}

    @functools.wraps(pl.Trainer.fit)  # the same signature: the CLI's fit options come from it
    def fit(self, *args, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(pl.Trainer, "fit", fit)
    cli(tmp_path=tmp_path)
    assert seen["weights_only"] is True  # not None (torch's default, which an environment variable flips)
    with pytest.raises(SystemExit) as exit_:
        cli("--weights_only", "false", tmp_path=tmp_path)
    assert exit_.value.code == 2
    assert "weights_only=false is refused" in capsys.readouterr().err


# -- exports ---------------------------------------------------------------------------------------
PICKLE_OR_TORCH_ZIP = (b"\x80", b"PK\x03\x04")


def test_export_writes_only_safetensors_and_text(tmp_path):
    from safetensors import safe_open

    from cheers_pl.io.export import export_model
    from cheers_pl.model import CheersModel
    from cheers_pl.spec import CheersSpec

    out = export_model(CheersModel(CheersSpec.tiny()), tmp_path / "export")  # the default format
    files = [p for p in out.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert weights and sum(p.stat().st_size for p in weights) > 0.9 * sum(p.stat().st_size for p in files)
    for p in files:
        assert not p.read_bytes()[:4].startswith(PICKLE_OR_TORCH_ZIP), p
        assert p.suffix in (".safetensors", ".json", ".jinja", ".txt", ".model"), p
    for p in weights:
        with safe_open(str(p), "pt") as f:
            assert list(f.keys())


# -- recipe paths ----------------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "a.png").write_bytes(b"inside")
    (outside / "secret.png").write_bytes(b"secret")
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "linked_dir").symlink_to(outside, target_is_directory=True)
    (root / "alias.png").symlink_to(root / "sub" / "a.png")  # a link that stays inside the root
    return root


@pytest.mark.parametrize("rel", ["../outside/secret.png", "sub/../../outside/secret.png", "ABS", "link.png",
                                 "linked_dir/secret.png"])  # fmt: skip
def test_recipe_paths_cannot_escape_their_root(tree, rel):
    from cheers_pl.data.schema import SampleError
    from data_recipes.writer import read_image_file

    rel = str(tree.parent / "outside" / "secret.png") if rel == "ABS" else rel
    with pytest.raises(SampleError) as err:
        read_image_file(tree, rel)
    assert err.value.reason == "bad_path"
    assert read_image_file(tree, "alias.png") == b"inside"  # links inside the root still work


def test_a_recipe_skips_a_linked_image_from_outside(tree, tmp_path):
    from data_recipes import imagefolder
    from tests.data_recipes.util import run_recipe, skipped_ids, write_image

    images = tmp_path / "images"
    write_image(images / "cat" / "1.png", seed=0)
    write_image(tmp_path / "outside" / "dog.png", seed=1)
    (images / "cat" / "2.png").symlink_to(tmp_path / "outside" / "dog.png")
    manifest = run_recipe(imagefolder, [images, "--missing-caption", "class", "--out", tmp_path / "out"])
    assert manifest["samples"] == 1 and manifest["skipped"] == {"bad_path": 1}
    assert skipped_ids(manifest, "bad_path") == ["cat/2"]
