import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

from cart import files
from cart.data import corpus
from cart.encoders import embed
from cart.errors import CartError
from cart.index import build_ids, identifiers, rqvae
from cart.index import trie as trie_module
from cart.index.trie import PrefixTrie
from cart.index.vocab import TokenLayout
from cart.settings import IdsConfig
from conftest import write_jsonl


def clustered(n=300, dim=16, centres=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(centres, dim, generator=g) * 3
    x = centre[torch.randint(centres, (n,), generator=g)] + torch.randn(n, dim, generator=g) * 0.5
    return torch.nn.functional.normalize(x, dim=-1)


SMALL = dict(clusters=6, levels=2, codebook_size=8, rqvae_hidden=32, rqvae_latent=8, rqvae_steps=60,
             rqvae_batch_size=64)


def test_token_layout_round_trip_both_directions():
    layout = TokenLayout([5, 7, 7, 3])
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, s, 50) for s in layout.level_sizes], axis=1)
    tokens = layout.to_tokens(codes)
    assert np.array_equal(layout.to_codes(tokens), codes)
    assert layout.vocab_size == 2 + 5 + 7 + 7 + 3
    # each level owns its own range: code 0 at level 1 and at level 2 are different tokens
    ranges = [layout.level_range(level) for level in range(4)]
    assert ranges == [(2, 7), (7, 14), (14, 21), (21, 24)]
    assert all(lo <= t < hi for row in tokens for t, (lo, hi) in zip(row, ranges))
    with pytest.raises(ValueError):
        layout.to_tokens(np.array([[5, 0, 0, 0]]))
    with pytest.raises(ValueError):
        layout.to_codes(np.array([[1, 7, 14, 21]]))  # EOS is not an identifier token


@pytest.mark.parametrize("seed", range(5))
def test_collision_counter_makes_rows_unique_in_order(seed):
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, 3, (200, 2))
    order = rng.random(200)
    counter, shared = identifiers.collision_counter(prefix, order)
    full = np.concatenate([prefix, counter[:, None]], axis=1)
    assert len(np.unique(full, axis=0)) == 200
    for key in np.unique(prefix, axis=0):
        rows = np.flatnonzero((prefix == key).all(1))
        assert sorted(counter[rows]) == list(range(len(rows)))
        assert list(rows[np.argsort(counter[rows])]) == list(rows[np.argsort(order[rows], kind="stable")])
        assert shared[rows].all() == (len(rows) > 1)


def test_residual_counter_names_how_an_item_differs_from_its_group_alike_in_every_group():
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(5, 16)) * 3  # the five ways a member differs from its group (say, a region)
    centres = rng.normal(size=(8, 16)) * 10
    grouped = (centres[:, None] + directions[None]).reshape(40, 16)  # 8 groups of 5: member j differs by j
    x = np.concatenate([grouped, rng.normal(size=(4, 16)) * 10]) + rng.normal(size=(44, 16)) * 0.01
    prefix = np.concatenate([np.repeat(np.arange(8), 5), np.arange(8, 12)])[:, None]  # then 4 items alone
    counter = identifiers.residual_counter(prefix, x, codes=3, seed=0)  # fewer codes than the largest group
    assert (counter[40:] == 0).all()
    groups = counter[:40].reshape(8, 5)
    assert all(sorted(g) == [1, 2, 3, 4, 5] for g in groups)  # distinct within a group
    assert (groups == groups[0]).all()  # the same difference, the same code, whatever the group


def random_identifiers(seed, sizes, n):
    rng = np.random.default_rng(seed)
    codes = np.unique(np.stack([rng.integers(0, s, n) for s in sizes], axis=1), axis=0)
    return codes[rng.permutation(len(codes))]


@pytest.mark.parametrize("seed, sizes, n", [(0, [4, 3, 3, 2], 40), (1, [2, 8, 8, 5], 120), (2, [10], 7),
                                            (3, [3, 3], 9), (4, [6, 50, 50, 4], 500)])
@pytest.mark.parametrize("dense", [True, False])
def test_allowed_tokens_equal_brute_force_for_every_prefix(seed, sizes, n, dense, monkeypatch):
    if not dense:  # every level through searchsorted, as the large levels of a big corpus go
        monkeypatch.setattr(trie_module, "DENSE_TABLE_MAX", 0)
    layout = TokenLayout(sizes)
    tokens = layout.to_tokens(random_identifiers(seed, sizes, n))
    trie = PrefixTrie(tokens, layout)
    for depth in range(layout.length + 1):
        prefixes = np.unique(tokens[:, :depth], axis=0)
        mask = trie.allowed_mask(torch.from_numpy(prefixes))  # all prefixes of this depth in one batch
        for prefix, row in zip(prefixes, mask):
            if depth == layout.length:
                expected = {TokenLayout.EOS}
            else:
                expected = {int(t[depth]) for t in tokens if np.array_equal(t[:depth], prefix)}
            assert set(row.nonzero().flatten().tolist()) == expected
    assert np.array_equal(trie.item_of(tokens), np.arange(len(tokens)))


@pytest.mark.parametrize("dense", [True, False])
def test_walking_one_code_at_a_time_finds_the_nodes_and_masks_of_whole_prefixes(dense, monkeypatch):
    if not dense:
        monkeypatch.setattr(trie_module, "DENSE_TABLE_MAX", 0)
    sizes = [6, 50, 50, 4]
    layout = TokenLayout(sizes)
    codes = random_identifiers(4, sizes, 500)
    trie = PrefixTrie(layout.to_tokens(codes), layout)
    offsets = np.asarray(layout.offsets[: layout.length])
    rng = np.random.default_rng(0)
    paths = np.zeros((len(codes), 0), dtype=np.int64)  # the codes taken so far
    node = np.zeros(len(codes), dtype=np.int64)
    for depth in range(layout.length):
        expected, ending = trie.log_mask(paths + offsets[:depth], strict=False)
        assert np.array_equal(trie.level_mask(node, depth), expected) and np.array_equal(node < 0, ending)
        # beam search's view: most rows follow a real identifier, some take a random code, which mostly
        # leaves the trie (-1 from then on: no child, a mask of -inf only)
        stray = rng.random(len(codes)) < 0.2
        step = np.where(stray, rng.integers(0, sizes[depth], len(codes)), codes[:, depth])
        paths = np.concatenate([paths, step[:, None]], 1)
        node = trie.child(node, depth, step)
        assert np.array_equal(node, trie.nodes(paths + offsets[: depth + 1], strict=False))
    real = trie.item_of(paths + offsets) >= 0  # a stray code may still have led to another identifier
    assert 0 < real.mean() < 1 and np.array_equal(node >= 0, real)


def test_unknown_prefix_is_a_clear_error_and_unknown_identifier_maps_to_minus_one():
    layout = TokenLayout([3, 3])
    tokens = layout.to_tokens(np.array([[0, 0], [0, 1], [2, 2]]))
    trie = PrefixTrie(tokens, layout)
    good = torch.from_numpy(tokens[:, :1])
    with pytest.raises(ValueError, match=r"prefix \[3\] is not a prefix of any identifier"):
        trie.allowed_mask(torch.cat([good, torch.tensor([[3]])]))
    with pytest.raises(ValueError, match=r"prefix \[5\] is not"):  # a token of the second level, first
        trie.allowed_mask(torch.tensor([[5]]))
    with pytest.raises(ValueError, match="longer than the identifiers"):
        trie.allowed_mask(torch.zeros(1, 3, dtype=torch.long))
    assert trie.item_of(layout.to_tokens(np.array([[2, 2], [1, 1]]))).tolist() == [2, -1]
    with pytest.raises(ValueError, match="not unique"):
        PrefixTrie(np.concatenate([tokens, tokens[:1]]), layout)
    lenient = trie.allowed_mask(torch.cat([torch.tensor([[3]]), good[:1]]), strict=False)  # a dead beam may only end
    assert lenient[0].nonzero().flatten().tolist() == [TokenLayout.EOS]
    assert lenient[1].nonzero().flatten().tolist() == tokens[:2, 1].tolist()


def test_trie_survives_save_and_load(tmp_path):
    layout = TokenLayout([4, 5, 3])
    tokens = layout.to_tokens(random_identifiers(7, [4, 5, 3], 30))
    trie = PrefixTrie(tokens, layout)
    trie.save(tmp_path / "t.marisa")
    loaded = PrefixTrie.load(tmp_path / "t.marisa", tokens, layout, trie.item_of_key)
    assert np.array_equal(loaded.item_of(tokens), np.arange(len(tokens)))


@pytest.mark.parametrize("scheme, length, counter", [(*s, c) for s in [("cart", 4), ("rq", 3), ("rqkmeans", 4), ("hkmeans", 4)]
                                                     for c in ("error", "residual")] + [("atomic", 1, "error")])
def test_every_scheme_gives_unique_fixed_length_identifiers(scheme, length, counter):
    x = clustered()
    built = identifiers.build(x.clone(), IdsConfig(scheme=scheme, counter=counter, **SMALL), seed=0)
    assert built.codes.shape == (300, length)
    assert len(np.unique(built.codes, axis=0)) == 300
    assert all((built.codes[:, i] < s).all() for i, s in enumerate(built.level_sizes))
    PrefixTrie(TokenLayout(built.level_sizes).to_tokens(built.codes), TokenLayout(built.level_sizes))


@pytest.mark.parametrize("scheme", ["cart", "rqkmeans"])
def test_three_fine_levels_give_identifiers_of_five_tokens(scheme):
    built = identifiers.build(clustered(), IdsConfig(scheme=scheme, **SMALL | {"levels": 3}), seed=0)
    assert built.codes.shape == (300, 5) and built.level_sizes[:4] == [6, 8, 8, 8]
    assert len(np.unique(built.codes, axis=0)) == 300
    # the third fine level splits groups the first two leave
    assert len(np.unique(built.codes[:, :4], axis=0)) > len(np.unique(built.codes[:, :3], axis=0))


def test_cart_identifiers_are_kmeans_then_rqvae_of_the_residual_and_deterministic():
    x = clustered()
    cfg = IdsConfig(**SMALL)
    first = identifiers.build(x.clone(), cfg, seed=3)
    again = identifiers.build(x.clone(), cfg, seed=3)
    assert np.array_equal(first.codes, again.codes)
    labels, _ = identifiers.kmeans(x.numpy(), 6, "auto", 3)
    assert np.array_equal(first.codes[:, 0], labels)
    residual = x - first.centroids[first.codes[:, 0]]
    assert np.array_equal(first.quantizer.encode(residual).numpy(), first.codes[:, 1:3])


def test_rqkmeans_codes_are_kmeans_of_each_levels_residual():
    x = clustered()
    built = identifiers.build(x.clone(), IdsConfig(scheme="rqkmeans", **SMALL), seed=3)
    labels, centroids = identifiers.kmeans(x.numpy(), 6, "auto", 3)
    assert np.array_equal(built.codes[:, 0], labels)
    residual = x.numpy() - centroids[labels]
    codes, codebook = identifiers.kmeans(residual, SMALL["codebook_size"], "auto", 4)
    assert np.array_equal(built.codes[:, 1], codes)
    # each level rebuilds the embeddings better: the geometry of its codes is what it removed
    layout = TokenLayout(built.level_sizes)
    geometry = identifiers.residual_means(built.codes, layout, x.numpy())
    tokens = layout.to_tokens(built.codes)
    errors = [np.linalg.norm(x.numpy() - geometry[tokens[:, :depth]].sum(1)) for depth in range(1, 4)]
    assert errors[0] > errors[1] > errors[2]
    assert built.stats["relative_reconstruction_error"] < 1


def test_rqvae_decode_inverts_encode_up_to_quantisation_and_learns():
    x = clustered(dim=16) * 2
    model = rqvae.train(x, hidden=32, latent=8, levels=2, codebook_size=8, commitment_weight=0.25, dead_code=0.5,
                        steps=150, batch_size=64, lr=3e-3, seed=0)
    codes = model.encode(x)
    model.eval()
    with torch.no_grad():
        reconstruction, forward_codes, _ = model(x)
    assert torch.equal(codes, forward_codes)
    assert torch.allclose(model.decode(codes), reconstruction, atol=1e-5)
    untrained = rqvae.RQVAE(dim=16, hidden=32, latent=8, levels=2, codebook_size=8).eval()
    untrained.scale.fill_(x.std())
    with torch.no_grad():
        assert (model(x)[0] - x).pow(2).mean() < (untrained(x)[0] - x).pow(2).mean()


def test_duplicate_embeddings_get_distinct_identifiers():
    x = clustered(n=40)
    x[10:20] = x[0]  # eleven identical rows
    built = identifiers.build(x.clone(), IdsConfig(**SMALL | {"clusters": 3}), seed=0)
    assert len(np.unique(built.codes, axis=0)) == 40
    assert sorted(built.codes[[0, *range(10, 20)], -1]) == list(range(11))  # the counter separates them


@pytest.fixture
def embedded_run(tiny_config, manifest):
    cfg = tiny_config(f"corpus.path={manifest}")
    corpus.run(cfg)
    embed.run(cfg)
    return cfg


def test_ids_stage_writes_its_files_and_loads_them_back(embedded_run):
    cfg = embedded_run
    out = build_ids.run(cfg)
    for name in (files.IDS, files.IDS_STATS, files.IDS_PLOT, files.RQVAE, files.TRIE):
        assert (cfg.run_dir / name).exists(), name
    summary = json.loads((cfg.run_dir / files.IDS_STATS).read_text())
    stats = summary["stats"]
    for key in ("collision_rate", "largest_counter", "first_level_group_size", "levels", "relative_reconstruction_error"):
        assert key in stats
    assert set(summary["phases"]) == {"kmeans", "rqvae_train", "rqvae_encode", "counter", "trie"}
    assert (cfg.run_dir / files.IDS_PLOT).read_bytes()[:4] == b"\x89PNG"
    loaded = build_ids.load(cfg.run_dir)
    assert loaded.codes.shape == (6, 4)
    assert np.array_equal(loaded.trie.item_of(loaded.tokens), np.arange(6))
    assert torch.equal(load_file(str(out))["codes"], torch.from_numpy(loaded.codes))


def test_ids_built_from_other_embeddings_are_refused(embedded_run, tmp_path):
    cfg = embedded_run
    build_ids.run(cfg)
    np.save(tmp_path / "other.npy", np.random.default_rng(0).random((6, 5), dtype=np.float32))
    cfg.embed.encoder, cfg.embed.weights = "precomputed", str(tmp_path / "other.npy")
    with pytest.raises(CartError, match="ids.safetensors were built from it: .* `cart embed --force`"):
        embed.run(cfg)
    embed.run(cfg, force=True)
    with pytest.raises(CartError, match="ids.safetensors was built from another embeddings.safetensors: rerun `cart ids`"):
        build_ids.load(cfg.run_dir)
    (cfg.run_dir / files.TRIE).write_bytes(b"junk")
    build_ids.run(cfg)
    (cfg.run_dir / files.TRIE).write_bytes(b"junk")
    with pytest.raises(CartError, match="trie.marisa is missing or does not match ids.safetensors"):
        build_ids.load(cfg.run_dir)


def test_ids_refuses_embeddings_of_another_corpus(embedded_run, manifest):
    cfg = embedded_run
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[0]["texts"] = ["crimson"]
    write_jsonl(manifest, rows)
    corpus.run(cfg, force=True)
    with pytest.raises(CartError, match="embeddings.safetensors was built from another corpus.jsonl: rerun `cart embed`"):
        build_ids.run(cfg)
    assert not (cfg.run_dir / files.IDS).exists()


@pytest.mark.parametrize("rows, overrides, message", [
    ("nan", [], r"row 2 \(item 'item2'\) has NaN or inf values"),
    ("zero", [], r"row 4 \(item 'item4'\) is all zeros"),
    ("ok", ["ids.clusters=7"], "ids.clusters=7 is more than the 6 items: lower it"),
    ("single", [], "1 item\\(s\\); identifiers need at least 2"),
])
def test_bad_embeddings_are_clear_errors(tiny_config, tmp_path, manifest, rows, overrides, message):
    from safetensors.torch import save_file

    cfg = tiny_config(f"corpus.path={manifest}", *overrides)
    corpus.run(cfg)
    matrix = torch.nn.functional.normalize(torch.rand(6, 5), dim=-1)
    if rows == "nan":
        matrix[2, 1] = float("nan")
    if rows == "zero":
        matrix[4] = 0
    if rows == "single":
        matrix = matrix[:1]
    path = cfg.run_dir / files.EMBEDDINGS  # written directly: cart embed itself refuses non-finite rows
    save_file({"embeddings": matrix}, str(path))
    files.write_manifest(path, "embed", {}, {files.CORPUS: files.sha256_file(cfg.run_dir / files.CORPUS)})
    with pytest.raises(CartError, match=message):
        build_ids.run(cfg)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6), st.integers(1, 40), st.floats(1.0, 2.0), st.integers(0, 2**16))
def test_balanced_labels_respect_capacity_and_leave_no_row_wanting(k, n, balance, seed):
    rng = np.random.default_rng(seed)
    x, centroids = rng.normal(size=(n, 3)).astype(np.float32), rng.normal(size=(k, 3)).astype(np.float32)
    capacity = np.full(k, int(np.ceil(balance * n / k)))
    labels = identifiers.balanced_labels(x, centroids, capacity)
    counts = np.bincount(labels, minlength=k)
    assert counts.sum() == n and (counts <= capacity).all()
    # stable (every centroid is among a row's choices here): a row nearer to another centroid than to its
    # own finds it full of rows nearer to it
    d = ((x[:, None] - centroids[None]) ** 2).sum(-1)
    for row in range(n):
        for c in np.flatnonzero(d[row] < d[row, labels[row]] - 1e-4):
            assert counts[c] == capacity[c] and (d[labels == c, c] <= d[row, c] + 1e-4).all()
    if capacity.min() >= n:  # room for everyone: plain nearest centroid
        assert np.allclose(d[np.arange(n), labels], d.min(1), atol=1e-4)


def test_balanced_kmeans_spreads_an_overused_cluster_and_refines_centroids():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (90, 4)), rng.normal(5, 0.1, (10, 4))]).astype(np.float32)
    plain, _ = identifiers.kmeans(x, 5, "full", 0)
    balanced, centroids = identifiers.kmeans(x, 5, "full", 0, balance=1.0)
    assert np.bincount(plain, minlength=5).max() > 20
    assert np.bincount(balanced, minlength=5).max() == 20
    assert np.allclose(centroids, np.stack([x[balanced == c].mean(0) for c in range(5)]), atol=1e-5)
    built = identifiers.build(torch.from_numpy(x), IdsConfig(scheme="rqkmeans", clusters=5, levels=2, codebook_size=4,
                                                              balance=1.0), seed=0)
    largest = [np.bincount(built.codes[:, level]).max() for level in range(3)]
    assert largest == [20, 25, 25]  # an even share of 100 items over 5 clusters, then over 4 codes
    assert len(np.unique(built.codes, axis=0)) == 100


@pytest.mark.parametrize("key", ["ids.codebook_size", "ids.rqvae_hidden"])
def test_an_rqvae_too_large_for_the_machine_is_refused_naming_its_key(embedded_run, tiny_config, manifest, key):
    with pytest.raises(CartError, match=rf"the RQ-VAE, sized most by {key}=1000000000000, then ids.\w+=\d+, needs "
                                        rf"about [\d,.]+ GiB, but cpu has [\d,.]+ GiB free: lower it"):
        build_ids.run(tiny_config(f"corpus.path={manifest}", f"{key}=1000000000000"))
