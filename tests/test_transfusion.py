"""TransFusion canonicalization of the transformer families (ViT, BERT), with and without the residual stream."""
import numpy as np
import pytest
import torch

from dwf_ray.archs import ArchSpec, build_model, permutation_spec
from dwf_ray.canon import transfusion
from dwf_ray.canon.matching import canonicalize, distance
from dwf_ray.archs.perm_spec import apply_permutation, compose_heads, random_permutation, split_heads
from dwf_ray.weights import to_module

ARCHS = {
    "vit": ArchSpec("vit", {"image_size": 8, "patch_size": 2, "num_layers": 2, "num_heads": 4, "hidden_dim": 32,
                            "mlp_dim": 64, "num_classes": 10, "in_channels": 1}),
    "bert": ArchSpec("bert", {"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                              "intermediate_size": 64, "max_position_embeddings": 16, "num_labels": 3}),
}
CASES = [(name, residual) for name in ARCHS for residual in (False, True)]
CASE_IDS = [f"{name}-{'residual' if residual else 'heads-mlp'}" for name, residual in CASES]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_state(arch: ArchSpec, seed: int) -> dict[str, np.ndarray]:
    """An initialised model plus noise on every parameter (the initial classifier, biases and LayerNorms are
    constant, which would hide permutation mistakes)."""
    torch.manual_seed(seed)
    model = build_model(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def inputs(arch: ArchSpec) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    if arch.family == "vit":
        return torch.randn(16, 1, 8, 8, generator=g)
    ids = torch.randint(1, arch.args["vocab_size"], (16, 12), generator=g)
    for row, length in enumerate(torch.randint(3, 13, (16,), generator=g).tolist()):
        ids[row, length:] = 0  # padding
    return ids


def outputs(arch: ArchSpec, state: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return to_module(arch, state)(inputs(arch)).numpy()


def assert_same_function(arch: ArchSpec, a: dict, b: dict):
    out_a, out_b = outputs(arch, a), outputs(arch, b)
    np.testing.assert_allclose(out_a, out_b, rtol=1e-4, atol=1e-5 * np.abs(out_a).max())


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


@pytest.mark.parametrize("name,residual", CASES, ids=CASE_IDS)
def test_canonicalized_model_computes_the_same_function_and_moves_closer(name, residual):
    arch = ARCHS[name]
    spec = permutation_spec(arch)
    ref, other = random_state(arch, 0), random_state(arch, 1)
    moved, perm = canonicalize(spec, ref, other, residual=residual)
    assert_same_function(arch, moved, other)
    assert distance(ref, moved, list(ref)) < distance(ref, other, list(ref))
    heads = split_heads(perm["L0.qk"], 4)[0]
    assert any((p != np.arange(len(p))).any() for p in perm.values()), "matching found nothing to permute"
    assert sorted(heads) == [0, 1, 2, 3]
    for k in residual_tensors(arch):
        if residual:
            np.testing.assert_array_equal(moved[k], apply_permutation(spec, {"R": perm["R"]}, {k: other[k]})[k])
        else:
            np.testing.assert_array_equal(moved[k], other[k])


@pytest.mark.parametrize("name,residual", CASES, ids=CASE_IDS)
def test_permuted_reference_maps_back_exactly(name, residual):
    arch = ARCHS[name]
    spec = permutation_spec(arch)
    used = spec if residual else spec.without_residual()
    ref = random_state(arch, 0)
    for seed in range(2):
        perm = random_permutation(used, ref, seed)
        assert (split_heads(perm["L0.qk"], 4)[0] != np.arange(4)).any()
        scrambled = apply_permutation(used, perm, ref)
        assert distance(ref, scrambled, list(ref)) > 1.0
        assert_same_function(arch, scrambled, ref)
        back, _ = canonicalize(spec, ref, scrambled, residual=residual)
        for k in ref:
            np.testing.assert_array_equal(back[k], ref[k], err_msg=k)


@pytest.mark.parametrize("name,residual", CASES, ids=CASE_IDS)
def test_canonicalizing_twice_changes_nothing(name, residual):
    arch = ARCHS[name]
    spec = permutation_spec(arch)
    ref, other = random_state(arch, 0), random_state(arch, 2)
    once, _ = canonicalize(spec, ref, other, residual=residual)
    twice, perm = canonicalize(spec, ref, once, residual=residual)
    assert all((p == np.arange(len(p))).all() for p in perm.values())
    for k in once:
        np.testing.assert_array_equal(once[k], twice[k])


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
