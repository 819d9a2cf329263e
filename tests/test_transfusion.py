"""TransFusion for the transformer families (ViT, BERT): spectra, head assignment, devices (the properties
every family shares are in test_family_contracts.py)."""
import numpy as np
import pytest
import torch

from dwf_ray.archs import ArchSpec, build_model, permutation_spec
from dwf_ray.canon import transfusion
from dwf_ray.canon.matching import canonicalize
from dwf_ray.archs.perm_spec import apply_permutation, compose_heads
from tests.conftest import family_examples, random_state

ARCHS = {k: v for k, v in family_examples().items() if k in ("vit", "bert")}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def residual_tensors(arch: ArchSpec) -> list[str]:
    """Tensors that only the residual-stream permutation moves (LayerNorms, embeddings, class token, positions)."""
    spec = permutation_spec(arch)
    return [k for k, perms in spec.axes.items() if set(perms) - {None} == spec.residual]


@pytest.mark.parametrize("name", ARCHS)
def test_spec_covers_every_tensor_and_residual_is_optional(name):
    arch = ARCHS[name]
    spec = permutation_spec(arch)
    state = random_state(arch, 0)
    assert set(state) == set(spec.axes)
    sizes = spec.sizes(state)
    assert sizes["R"] == 32 and sizes["L0.qk"] == sizes["L0.vo"] == 32 and sizes["L1.mlp"] == 64
    assert len(spec.attention) == 2
    assert residual_tensors(arch), "LayerNorms and embeddings follow the residual stream"
    plain = spec.without_residual()
    assert all("R" not in perms for perms in plain.axes.values())


def test_head_spectra_are_one_array_per_block_matching_each_heads_svd():
    arch = ARCHS["vit"]
    spec = permutation_spec(arch)
    state = random_state(arch, 0)
    spectra = transfusion.head_spectra(spec, state)
    assert len(spectra) == 2 and spectra[0].shape == (4, 3, 8)
    w = state["encoder.layers.encoder_layer_1.self_attention.in_proj_weight"].astype(np.float64)
    for h in range(4):
        for m in range(3):  # Q, K, V
            rows = w[m * 32 + h * 8: m * 32 + (h + 1) * 8]
            np.testing.assert_allclose(spectra[1][h, m], np.linalg.svd(rows, compute_uv=False), rtol=1e-10)


@pytest.mark.parametrize("name", ARCHS)
def test_spectra_are_computed_once_per_model_not_per_head_pair(name, monkeypatch):
    """One batched SVD per attention block and model, however many heads and coordinate-ascent sweeps."""
    arch = ARCHS[name]
    spec = permutation_spec(arch)
    calls = []
    svdvals = torch.linalg.svdvals

    def counting(x, *a, **kw):
        calls.append(tuple(x.shape))
        return svdvals(x, *a, **kw)

    monkeypatch.setattr(torch.linalg, "svdvals", counting)
    canonicalize(spec, random_state(arch, 0), random_state(arch, 3), residual=True)
    assert calls == [(4, 3, 8, 32)] * 4  # 2 blocks x (reference, other), all 4 heads x Q, K, V at once


def test_spectral_assignment_recovers_a_head_permutation_under_intra_head_and_residual_permutations():
    rng = np.random.default_rng(0)
    spec = permutation_spec(ARCHS["vit"])
    state = random_state(ARCHS["vit"], 0)
    heads = rng.permutation(4)
    perm = {"R": rng.permutation(32), "L0.mlp": np.arange(64), "L1.mlp": np.arange(64)}
    for layer in ("L0", "L1"):
        for kind in ("qk", "vo"):
            perm[f"{layer}.{kind}"] = compose_heads(heads, np.stack([rng.permutation(8) for _ in range(4)]))
    moved = apply_permutation(spec, perm, state)
    for ref_s, moved_s in zip(transfusion.head_spectra(spec, state), transfusion.head_spectra(spec, moved)):
        np.testing.assert_array_equal(transfusion.spectral_head_assignment(ref_s, moved_s), np.argsort(heads))


def test_bert_padding_is_masked_and_vit_takes_one_channel():
    torch.manual_seed(0)
    bert = build_model(ARCHS["bert"]).eval()
    ids = torch.tensor([[5, 7, 9, 0, 0], [3, 4, 0, 0, 0]])
    with torch.no_grad():
        short, long = bert(ids), bert(torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1))
    assert short.shape == (2, 3)
    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-6)
    assert build_model(ARCHS["vit"]).eval()(torch.randn(2, 1, 8, 8)).shape == (2, 10)


DEVICES = [torch.device("cpu"),  # the torch code path on the CPU ("cpu" as a string is the numpy path)
           pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES, ids=["torch-cpu", "cuda"])
@pytest.mark.parametrize("name", ARCHS)
def test_torch_similarities_on_a_device_give_the_numpy_result(name, device):
    arch = ARCHS[name]
    spec = permutation_spec(arch)
    ref, other = random_state(arch, 0), random_state(arch, 1)
    expected, expected_perm = canonicalize(spec, ref, other, residual=True)
    got, perm = canonicalize(spec, ref, other, residual=True, device=device)
    for p in expected_perm:
        np.testing.assert_array_equal(perm[p], expected_perm[p], err_msg=p)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
