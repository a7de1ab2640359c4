"""Training stages: what trains, the LR schedule, stage hand-off, and every YAML through the CLI."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from cheers_pl.cli import main
from cheers_pl.smoke import mixed_batch
from cheers_pl.spec import CheersSpec
from cheers_pl.stages import STAGES, AlignmentStage, PretrainStage, SFTStage
from cheers_pl.stages.weights import read_state_dict

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
STAGE_FILES = {
    "stage1": "stage1_alignment.yaml",
    "stage2": "stage2_pretrain.yaml",
    "stage3": "stage3_refined.yaml",
    "stage4": "stage4_sft.yaml",
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["data", "demo", "--out", str(out), "--digits", "30", "--texts", "20"]) == 0
    return out


def built(cls, **kw):
    module = cls(spec=CheersSpec.tiny(), **kw)
    module.configure_model()
    return module


def trainable(module):
    return {n for n, p in module.model.named_parameters() if p.requires_grad}


def test_stage_one_trains_only_the_new_modules_and_token_rows():
    m = built(AlignmentStage)
    names = trainable(m)
    embed = "llm.model.model.embed_tokens.weight"
    assert names == {
        n for n in dict(m.model.named_parameters()) if n.startswith(("projector.", "cfm_head."))
    } | {embed}
    m.model(mixed_batch(m.model)).loss.backward()
    grad = dict(m.model.named_parameters())[embed].grad
    rows = grad.abs().sum(-1).nonzero().flatten().tolist()
    assert rows and set(rows) <= m.new_token_ids()  # only the added tokens' rows (LM head tied) move


@pytest.mark.parametrize("name", ["stage2", "stage3", "stage4"])
def test_later_stages_train_all_but_the_vae(name):
    m = built(STAGES[name])
    every = dict(m.model.named_parameters())
    frozen = {n for n in every if n not in trainable(m)}
    assert frozen == {n for n in every if n.startswith(("vae.", "semantic_encoder.vit.head."))}


def test_stage_defaults_follow_the_paper():
    assert [(STAGES[s]().lr, STAGES[s]().schedule) for s in STAGES] == [
        (1e-4, "constant"), (1e-4, "constant"), (4e-5, "constant"), (2e-5, "cosine")
    ]  # fmt: skip


def lrs(module, steps):
    module.trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    out = []
    for _ in range(steps + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_constant_schedule_with_warmup():
    lr = lrs(built(PretrainStage), 100)
    assert lr[0] == 0.0 and lr[1] == pytest.approx(0.5e-4) and lr[2] == pytest.approx(1e-4)  # 2% of 100 = 2
    assert lr[50] == pytest.approx(1e-4) and lr[100] == pytest.approx(1e-4)


def test_cosine_schedule_with_warmup():
    lr = lrs(built(SFTStage), 100)
    assert lr[0] == 0.0 and lr[2] == pytest.approx(2e-5)
    mid = 2e-5 * 0.5 * (1 + math.cos(math.pi * (51 - 2) / 98))
    assert lr[51] == pytest.approx(mid) and lr[100] == pytest.approx(0.0, abs=1e-12)


def test_bad_stage_arguments_fail_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        PretrainStage(spec=CheersSpec.tiny(), init_from=str(tmp_path / "nowhere.ckpt"))
    with pytest.raises(ValueError, match=r"valid choices are \['constant', 'cosine'\]"):
        PretrainStage(spec=CheersSpec.tiny(), schedule="linear")
    with pytest.raises(FileNotFoundError, match="no-such-vae"):
        AlignmentStage(spec=CheersSpec.pretrained("x", "y", str(tmp_path / "no-such-vae")))


def test_printing_a_paper_config_builds_nothing(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "-c", str(EXPERIMENTS / STAGE_FILES["stage4"]), "--print_config"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "SFTStage" in text and "mixture: batch" in text and "num_nodes: 16" in text


@pytest.mark.parametrize("name", list(STAGE_FILES))
@pytest.mark.parametrize("tiny", [False, True])
def test_every_yaml_parses_against_the_code(name, tiny, capsys):
    args = ["fit", "-c", str(EXPERIMENTS / STAGE_FILES[name])]
    args += ["-c", str(EXPERIMENTS / "tiny.yaml")] if tiny else []
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--trainer.default_root_dir", "somewhere/" + name, "--print_config"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert f"dirpath: somewhere/{name}/checkpoints" in text  # references resolve after overrides
    if name != "stage1":
        assert f"init_from: somewhere/{name}/../stage1".replace("stage1", f"stage{int(name[-1]) - 1}") in text


def test_unknown_keys_are_refused_at_parse_time(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "fit",
                "-c",
                str(EXPERIMENTS / STAGE_FILES["stage1"]),
                "--model.init_args.lr_max",
                "1",
                "--print_config",
            ]
        )
    assert exit_.value.code != 0
    assert "lr_max" in capsys.readouterr().err


def fit(name, root, demo, *extra):
    args = ["fit", "-c", str(EXPERIMENTS / STAGE_FILES[name]), "-c", str(EXPERIMENTS / "tiny.yaml")]
    args += [
        "--trainer.default_root_dir",
        str(root / name),
        "--data.root",
        str(demo),
        "--trainer.max_steps",
        "2",
    ]
    main([*args, "--trainer.enable_progress_bar", "false", *extra])
    return root / name / "latest" / "checkpoints" / "last.ckpt"  # the last finished run (run_folder.py)


def test_four_stages_run_tiny_and_hand_off(tmp_path, demo):
    ckpts = {}
    for name in STAGE_FILES:
        ckpts[name] = fit(name, tmp_path, demo)
        assert ckpts[name].is_file()
    # stage II starts from stage I's weights exactly (weights only: a new optimiser and schedule)
    start = PretrainStage(spec=CheersSpec.tiny(), init_from=str(ckpts["stage1"]))
    start.configure_model()
    ref = read_state_dict(ckpts["stage1"])
    got = start.model.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    saved = torch.load(ckpts["stage2"], map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2 and saved["hyper_parameters"]["init_from"].endswith(
        "stage1/latest/checkpoints/last.ckpt"
    )
    assert "CheersDataModule" in saved  # the data position travels with the checkpoint


def test_resume_restores_the_stage_and_the_saved_config_reruns(tmp_path, demo):
    last = fit("stage1", tmp_path, demo)
    run = last.resolve().parents[1]
    fit("stage1", tmp_path, demo, "--ckpt_path", str(last), "--trainer.max_steps", "4")  # in the same run
    assert last.resolve().parents[1] == run
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
    config = sorted((run / "tb").glob("version_*/config.yaml"))[0]  # the first fit's
    text = config.read_text()
    assert "${" not in text and str(run / "checkpoints") in text  # fully resolved
    main(["fit", "-c", str(config), "--trainer.max_steps", "1"])  # reruns as it is, as a new run beside
    assert last.resolve().parents[1] != run
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 1
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4  # kept


def test_start_up_errors_name_the_path(tmp_path, demo, capsys):
    with pytest.raises(SystemExit):  # a parse error, before the module is built
        fit("stage2", tmp_path, demo)  # no stage I run in this folder
    err = capsys.readouterr().err
    assert "stage1/latest/checkpoints/last.ckpt; it is written by `make stage1`" in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty/understanding/? does not exist"):
        fit("stage1", tmp_path, tmp_path / "empty")


def test_compile_head_compiles_in_place_and_keeps_names_and_losses():
    torch.manual_seed(0)
    plain = built(PretrainStage)
    torch.manual_seed(0)
    compiled = built(PretrainStage, compile_head=True, compile_options={"backend": "aot_eager"})
    head = compiled.model.cfm_head
    assert head._compiled_call_impl is not None and plain.model.cfm_head._compiled_call_impl is None
    assert list(compiled.model.state_dict()) == list(plain.model.state_dict())  # no "_orig_mod."
    batch = mixed_batch(plain.model)
    losses = [m.model(batch, generator=torch.Generator().manual_seed(0)).loss for m in (plain, compiled)]
    torch.testing.assert_close(losses[1], losses[0])
    losses[1].backward()
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)
    with pytest.raises(Exception, match="no_such_backend"):
        built(PretrainStage, compile_head=True, compile_options={"backend": "no_such_backend"})
