"""Zoos the way people keep them: transformers `save_pretrained` folders and torchvision state_dicts import
under their own names (no hand-written ArchSpec where the files say what they are), go through canon, PCA and
the flow, and the generated models export in the form their library loads directly."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from dwf_ray.cli import app
from tests.conftest import dwf

# the smallest run after the zoo: a few flow steps, two samples, one temperature
TINY_RUN = ["--set", "flow.steps=20", "--set", "flow.num_workers=1", "--set", "flow.eval_every=10",
            "--set", "flow.warmup_steps=2", "--set", "flow.hidden=32", "--set", "sample.n=2",
            "--set", "sample.steps=4", "--set", "eval.temperatures=[1.0]"]
BERT = {"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 16, "num_labels": 3}


def refused(*args: str) -> str:
    """The one stderr line of a `dwf` command that must exit 2."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dwf: error:") and "Traceback" not in result.output, result.stderr
    return lines[0]


def save_bert(folder, seed: int, how: str = "safetensors", **sizes):
    """A BertForSequenceClassification written as transformers writes it: ``safetensors`` (model.safetensors),
    ``sharded`` (model-0000x-of-0000y.safetensors + index) or ``bin`` (pytorch_model.bin, older versions)."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(**{**BERT, **sizes}))
    if how == "bin":
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder, max_shard_size="20KB" if how == "sharded" else "5GB")
    return model


def token_ids(n: int = 6, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, BERT["vocab_size"], (n, length), generator=g)
    for row in range(n):
        ids[row, 3 + 2 * row:] = 0   # padding
    return ids


def test_save_pretrained_berts_import_without_arch_and_export_for_from_pretrained(tmp_path, ray_session):
    from transformers import BertForSequenceClassification
    from dwf_ray.archs import ArchSpec
    from dwf_ray.weights import load_model_state, to_module
    from dwf_ray.zoo.formats import infer_arch
    src = tmp_path / "hub"
    hows = ["safetensors", "sharded", "safetensors", "bin", "safetensors"]
    models = [save_bert(src / f"bert-{i}", i, how) for i, how in enumerate(hows)]
    assert len(list((src / "bert-1").glob("model-0000*-of-0000*.safetensors"))) > 1
    (src / "bert-0" / "training_args.bin").write_bytes(b"a Trainer's pickle, not a model")
    root = tmp_path / "run"

    out = dwf("zoo", "import", str(src), "--dataset", "text-synth", "--root", str(root), *TINY_RUN)
    arch = ArchSpec("bert", {**BERT, "type_vocab_size": 2})   # transformers' default, unlike the family's
    assert "architecture from the files" in out
    zoo = pd.read_parquet(root / "zoo" / "manifest.parquet")
    assert len(zoo) == 5 and (zoo["status"] == "ok").all(), zoo["error"].tolist()
    assert zoo["source_uri"].str.endswith(("model.safetensors", "model.safetensors.index.json", "model.safetensors",
                                           "pytorch_model.bin", "model.safetensors")).all()
    for row, model in zip(zoo.itertuples(), models):
        state, got = load_model_state(row.uri)
        assert got == arch and set(state) == {k for k, _ in model.named_parameters()}
        np.testing.assert_array_equal(state["classifier.weight"], model.classifier.weight.detach().numpy())

    dwf("canon", "--root", str(root))
    dwf("pca", "--root", str(root))
    canon = pd.read_parquet(root / "canonical" / "manifest.parquet")
    assert (canon["status"] == "ok").all() and np.load(root / "pca" / "latents.npy").shape[0] == 5
    dwf("flow", "--root", str(root))
    dwf("sample", "--root", str(root))

    export = tmp_path / "export"
    dwf("export", "--root", str(root), "--format", "hf", "--out", str(export))
    man = pd.read_parquet(export / "manifest.parquet")
    assert list(man["model_id"]) == ["g00000", "g00001"] and (man["format"] == "hf").all()
    generated, _ = load_model_state(man["source_uri"].iloc[0])
    ours = to_module(arch, generated)
    hf = BertForSequenceClassification.from_pretrained(man["uri"].iloc[0]).eval()
    ids = token_ids()
    with torch.no_grad():
        np.testing.assert_allclose(hf(input_ids=ids, attention_mask=(ids != 0).long()).logits.numpy(),
                                   ours(ids).numpy(), rtol=1e-5, atol=1e-5)
    assert infer_arch(str(export)) == arch          # the exported folders import again as they are
    assert "bert" in refused("export", "--root", str(root), "--format", "torchvision", "--out", str(tmp_path / "x"))


TORCHVISION = {
    "resnet18": ({"num_classes": 10}, lambda: __import__("torchvision").models.resnet18(num_classes=10)),
    "vit": ({"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32,
             "num_classes": 10},
            lambda: __import__("torchvision").models.VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=10)),
}


def decoded_samples(root, arch) -> None:
    """The sample stage's output without training a flow (the BERT test does; a flow costs a Ray Train start):
    two models decoded by the run's PCA from latents between the zoo's, written by the sample stage's writer."""
    from dwf_ray import store
    from dwf_ray.pca.model import PCAModel
    from dwf_ray.sample.generator import write_samples
    from dwf_ray.store import RunStore
    st = RunStore(str(root))
    z = PCAModel.load_latents(st.uri("pca"))
    flat = PCAModel.load(st.uri("pca")).decode(np.stack([z.mean(0), 0.7 * z[0] + 0.3 * z[1]]))
    store.write_table(st.uri("samples", "manifest.parquet"), write_samples(flat, arch, st.uri("samples")))
    st.mark_done("samples", {"n": len(flat)})


@pytest.mark.parametrize("family", list(TORCHVISION))
def test_torchvision_state_dicts_import_and_export_for_torchvision(family, tmp_path, ray_session):
    """torchvision's own resnet18 and a small VisionTransformer (vit_b_16's class and names): their state_dicts
    import with --arch (they do not say what they are), go through canon and PCA, and models decoded from the
    PCA export as state_dicts that the torchvision constructor loads strictly, BatchNorm recalibrated."""
    from tests.test_families import write_cifar10
    from dwf_ray.accuracy import recalibrate_batchnorm
    from dwf_ray.archs import ArchSpec
    from dwf_ray.config import RunConfig
    from dwf_ray.data import dataset_for
    from dwf_ray.weights import load_model_state, to_module
    args, construct = TORCHVISION[family]
    arch = ArchSpec(family, args)
    src = tmp_path / "trained"
    src.mkdir()
    for i in range(3):
        torch.manual_seed(i)
        torch.save(construct().state_dict(), src / f"{family}_seed{i}.pth")
    write_cifar10(tmp_path / "data")
    line = refused("zoo", "import", str(src), "--root", str(tmp_path / "no-arch"))
    assert "pass --arch" in line and "state_dict" in line

    root = tmp_path / "run"
    dwf("zoo", "import", str(src), "--arch", arch.to_json(), "--dataset", "cifar10", "--root", str(root),
        "--set", f"zoo.data_root={json.dumps(str(tmp_path / 'data'))}", "--set", "canon.max_iter=3")
    assert (pd.read_parquet(root / "zoo" / "manifest.parquet")["status"] == "ok").all()
    dwf("canon", "--root", str(root))
    dwf("pca", "--root", str(root))
    decoded_samples(root, arch)

    export = tmp_path / "export"
    dwf("export", "--root", str(root), "--format", "torchvision", "--out", str(export))
    man = pd.read_parquet(export / "manifest.parquet")
    assert len(man) == 2 and man["uri"].str.endswith(".pt").all()
    tv = construct().eval()
    tv.load_state_dict(torch.load(man["uri"].iloc[0], weights_only=True), strict=True)
    generated, _ = load_model_state(man["source_uri"].iloc[0])
    ours, cfg = to_module(arch, generated), RunConfig.model_validate_json((root / "config.json").read_text())
    recalibrate_batchnorm(ours, dataset_for(cfg.zoo).train, cfg.eval.bn_recal_batches, seed=cfg.eval.seed)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.testing.assert_allclose(tv(x).numpy(), ours.eval()(x).numpy(), rtol=1e-4, atol=1e-4)
    if family == "resnet18":   # generated checkpoints carry no statistics: these come from the training split
        assert man["bn_stats"].iloc[0].startswith("recalibrated") and not torch.allclose(tv.bn1.running_var,
                                                                                          torch.ones(64))
    assert "torchvision" in man["loads_with"].iloc[0]
    assert "bert" in refused("export", "--root", str(root), "--format", "hf", "--out", str(tmp_path / "x"))


def test_a_folder_of_mixed_architectures_is_refused_naming_the_odd_ones_out(tmp_path):
    from dwf_ray.archs import ArchSpec, build_model
    from dwf_ray.weights import save_checkpoint
    src = tmp_path / "mixed"
    for i in range(3):
        save_bert(src / f"bert-{i}", i)
    save_bert(src / "bert-wide", 3, hidden_size=16, num_attention_heads=2)
    mlp = ArchSpec("mlp", {"in_dim": 8, "hidden": [4], "out_dim": 2})
    save_checkpoint(str(src / "extra.safetensors"),
                    {k: v.detach().numpy() for k, v in build_model(mlp).state_dict().items()}, mlp)
    line = refused("zoo", "import", str(src), "--root", str(tmp_path / "run"))
    assert "mixed architectures" in line and "3 models are bert" in line
    assert "bert-wide (bert hidden_size=16 num_attention_heads=2)" in line and "extra.safetensors (mlp)" in line
    assert "bert-0" not in line and not (tmp_path / "run").exists()


def test_a_config_json_of_an_unsupported_model_type_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    src = tmp_path / "zoo"
    save_bert(src / "bert-0", 0)
    GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2)).save_pretrained(
        src / "gpt2-0")
    line = refused("zoo", "import", str(src), "--root", str(tmp_path / "run"))
    assert "gpt2-0/config.json" in line and "model_type 'gpt2' is not supported" in line and "supported: bert" in line


def test_save_pretrained_folders_on_s3_read_through_the_store(tmp_path, s3_server):
    """A sharded folder and a pytorch_model.bin folder under an s3:// prefix: the ArchSpec from config.json,
    every shard read through the store."""
    from dwf_ray import store
    from dwf_ray.weights import load_model_state
    from dwf_ray.zoo.formats import infer_arch, scan
    src = f"s3://{s3_server()}/hub"
    models = {"a": save_bert(tmp_path / "a", 0, "sharded"), "b": save_bert(tmp_path / "b", 1, "bin")}
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file():
            store.write_bytes(f"{src}/{path.relative_to(tmp_path)}", path.read_bytes())
    arch = infer_arch(src)
    assert arch.family == "bert" and arch.args["hidden_size"] == 32
    found = scan(src)
    assert [f.name for f in found] == ["a", "b"]
    assert found[0].uri.endswith("a/model.safetensors.index.json") and found[1].uri.endswith("b/pytorch_model.bin")
    for f, model in zip(found, models.values()):
        state, _ = load_model_state(f.uri, arch)
        np.testing.assert_array_equal(state["bert.encoder.layer.1.output.dense.weight"],
                                      model.bert.encoder.layer[1].output.dense.weight.detach().numpy())


def test_bfloat16_save_pretrained_weights_read_as_float32(tmp_path):
    from dwf_ray.weights import load_model_state
    from dwf_ray.zoo.formats import infer_arch, scan
    model = save_bert(tmp_path / "float32", 0)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "hub" / "bf16")
    arch = infer_arch(str(tmp_path / "hub"))
    state, _ = load_model_state(scan(str(tmp_path / "hub"))[0].uri, arch)
    want = model.classifier.weight.detach().float().numpy()
    assert state["classifier.weight"].dtype == np.float32
    np.testing.assert_array_equal(state["classifier.weight"], want)
