"""Stage `cart ids`: one unique fixed-length identifier per item, and the trie that constrains decoding.

Reads `embeddings.safetensors`. Writes:
- `ids.safetensors`: `codes` (N x L int64, row i is item i's identifier, one code per level),
  `item_of_key` (the trie's key id -> item), `centroids` (K x D, schemes with K-Means);
- `rqvae.safetensors`: the RQ-VAE's weights (schemes cart and rq), its arguments in the metadata;
- `trie.marisa`: the prefix database of all identifiers;
- `ids.json`: the token layout and statistics; `ids.png`: cluster sizes and code usage.
`load(run_dir)` gives the identifiers back, refusing ones built from other embeddings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cart import files
from cart.config import Config, to_dict
from cart.devices import require_memory
from cart.devices import phase
from cart.errors import CartError
from cart.index import identifiers
from cart.index.trie import PrefixTrie
from cart.index.vocab import TokenLayout


@dataclass
class Identifiers:
    codes: np.ndarray  # (N, L) codes, row i names item i
    layout: TokenLayout
    trie: PrefixTrie
    stats: dict

    @property
    def tokens(self) -> np.ndarray:
        return self.layout.to_tokens(self.codes)


def run(cfg: Config, force: bool = False) -> Path:
    """Build the identifiers of the run's embeddings; return the path of `ids.safetensors`. Identifiers of
    the same embeddings and settings are kept; other ones a model was trained on are replaced only with
    `force`."""
    run_dir, ids_cfg = cfg.run_dir, cfg.ids
    path, embed_manifest = files.verified_input(run_dir, files.EMBEDDINGS)
    files.require_built_from(embed_manifest, files.EMBEDDINGS, run_dir, files.CORPUS)  # not stale
    out = run_dir / files.IDS
    recipe = {"embeddings": embed_manifest["sha256"], "ids": to_dict(cfg)["ids"], "seed": cfg.seed}
    if files.check_replace(run_dir, files.IDS, recipe, force):
        try:
            load(run_dir)  # the trie and the other files beside it whole too
            print(f"ids: {out} is up to date (the same embeddings and ids settings; --force builds them again)")
            return out
        except CartError as e:
            print(f"ids: building them again, the same way: {e}")
    x = load_file(str(path))["embeddings"]
    _check(x, cfg)
    phases: dict = {}
    codes = identifiers.build(x, ids_cfg, cfg.seed, phases)
    del x
    layout = TokenLayout(codes.level_sizes)
    with phase(phases, "trie"):
        trie = PrefixTrie(layout.to_tokens(codes.codes), layout)
    stats = identifiers.code_stats(codes)
    tensors = {"codes": torch.from_numpy(codes.codes), "item_of_key": torch.from_numpy(trie.item_of_key)}
    if codes.centroids is not None:
        tensors["centroids"] = codes.centroids.contiguous()
    with files.atomic_path(run_dir / files.TRIE) as tmp:
        trie.save(tmp)
    companions = [files.TRIE, files.IDS_STATS, files.IDS_PLOT]
    if codes.quantizer is not None:
        with files.atomic_path(run_dir / files.RQVAE) as tmp:
            save_file({k: v.contiguous() for k, v in codes.quantizer.state_dict().items()}, str(tmp),
                      metadata={"args": json.dumps(codes.quantizer.args)})
        companions.append(files.RQVAE)
    summary = {"scheme": ids_cfg.scheme, "level_sizes": layout.level_sizes, "vocab_size": layout.vocab_size,
               "special_tokens": {"pad": TokenLayout.PAD, "eos": TokenLayout.EOS},
               "level_offsets": layout.offsets.tolist(), "stats": stats, "phases": phases}
    files.write_text(run_dir / files.IDS_STATS, json.dumps(summary, indent=2) + "\n")
    identifiers.plot_codes(stats, codes.codes, run_dir / files.IDS_PLOT)
    with files.atomic_path(out) as tmp:
        save_file(tensors, str(tmp))
    files.write_manifest(out, "ids", to_dict(cfg), {files.EMBEDDINGS: embed_manifest["sha256"]}, recipe=recipe,
                         companions={name: files.sha256_file(run_dir / name) for name in companions})
    print(describe(summary))
    print(f"ids: {len(codes.codes)} identifiers of length {layout.length} -> {out}")
    return out


def load(run_dir: Path) -> Identifiers:
    """The run's identifiers, refusing files that do not match their manifest or other embeddings."""
    path, manifest = files.verified_input(run_dir, files.IDS)
    files.require_built_from(manifest, files.IDS, run_dir, files.EMBEDDINGS)
    files.verify_companions(run_dir, manifest, "cart ids")
    tensors = load_file(str(path))
    summary = json.loads((Path(run_dir) / files.IDS_STATS).read_text(encoding="utf-8"))
    layout = TokenLayout(summary["level_sizes"])
    codes = tensors["codes"].numpy()
    trie = PrefixTrie.load(Path(run_dir) / files.TRIE, layout.to_tokens(codes), layout, tensors["item_of_key"].numpy())
    return Identifiers(codes, layout, trie, summary["stats"])


def _check(x: torch.Tensor, cfg: Config) -> None:
    ids_cfg, n = cfg.ids, len(x)
    where = cfg.run_dir / files.EMBEDDINGS
    if n < 2:
        raise CartError(f"{where}: {n} item(s); identifiers need at least 2")
    bad = ~torch.isfinite(x).all(dim=1)
    if bad.any():
        raise CartError(f"{where}: row {int(bad.nonzero()[0])} {_item(cfg, int(bad.nonzero()[0]))}has NaN or inf values")
    zero = (x == 0).all(dim=1)
    if zero.any():
        raise CartError(f"{where}: row {int(zero.nonzero()[0])} {_item(cfg, int(zero.nonzero()[0]))}is all zeros")
    if ids_cfg.scheme in ("cart", "rqkmeans", "hkmeans") and ids_cfg.clusters > n:
        raise CartError(f"ids.clusters={ids_cfg.clusters} is more than the {n} items: lower it")
    if ids_cfg.scheme == "rqkmeans" and ids_cfg.codebook_size > n:  # each level is a K-Means of all the items' residuals
        raise CartError(f"ids.codebook_size={ids_cfg.codebook_size} is more than the {n} items: lower it")
    if ids_cfg.scheme in ("cart", "rq"):
        parts = rqvae_bytes(ids_cfg, x.shape[1])
        sizes = ", then ".join(f"{key}={getattr(ids_cfg, key.split('.')[1])}" for key in parts)
        require_memory(sum(parts.values()), torch.device("cpu"), f"the RQ-VAE, sized most by {sizes},")


def rqvae_bytes(ids_cfg, dim: int) -> dict[str, int]:
    """About the memory the RQ-VAE's training takes, float32, by the setting that sizes each part (the
    largest first): its MLPs with their gradients and Adam's moments and a batch's activations, and its
    codebooks with their running averages and a batch's distances to every code."""
    batch = ids_cfg.rqvae_batch_size
    mlps = 4 * (4 * 2 * (dim + ids_cfg.rqvae_latent) * ids_cfg.rqvae_hidden + 4 * batch * ids_cfg.rqvae_hidden)
    codebooks = 4 * ids_cfg.levels * ids_cfg.codebook_size * (3 * ids_cfg.rqvae_latent + 4 * batch)
    parts = {"ids.rqvae_hidden": mlps, "ids.codebook_size": codebooks}
    return dict(sorted(parts.items(), key=lambda part: -part[1]))


def _item(cfg: Config, row: int) -> str:
    try:
        with open(cfg.run_dir / files.CORPUS, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i == row:
                    return f"(item {json.loads(line)['id']!r}) "
    except (OSError, ValueError, KeyError):
        pass
    return ""


def describe(summary: dict) -> str:
    s = summary["stats"]
    group = s["first_level_group_size"]
    usage = ", ".join(f"{lv['used']}/{lv['size']} ({lv['entropy_bits']:.1f} bits)" for lv in s["levels"])
    lines = [
        f"ids: scheme {summary['scheme']}, level sizes {summary['level_sizes']}, decoder vocab {summary['vocab_size']}",
        f"     collision rate before the counter {s['collision_rate']:.3f}, largest group {s['largest_group']}",
        f"     first-level groups min/median/max {group['min']}/{group['median']:.0f}/{group['max']}"
        f" ({group['empty']} empty); codes used per level: {usage}",
    ]
    if "relative_reconstruction_error" in s:
        lines.append(f"     quantiser relative reconstruction error {s['relative_reconstruction_error']:.3f}")
    return "\n".join(lines)
