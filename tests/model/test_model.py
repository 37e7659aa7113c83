"""The CART model (fusion), the loss (R-Drop) and trie-constrained decoding, on tiny random models."""

import numpy as np
import pytest
import torch

from cart.index.identifiers import TokenLayout, residual_means
from cart.index.trie import PrefixTrie
from cart.model.cart_t5 import CartT5, cart_config
from cart.model.decoding import TrieConstraint, decode, score_identifiers
from cart.model.fusion import FusedCrossAttention, LayerFusionEncoder
from cart.model.losses import cart_loss

SIZES = dict(d_model=16, d_kv=8, d_ff=32, num_layers=3, num_decoder_layers=2, num_heads=2)


TINY_BERT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                 max_position_embeddings=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def tiny_model(fusion=True, dropout=0.0, levels=(4, 6), seed=0, attn="sdpa", bert=False, frozen=False, **options):
    """A tiny CartT5 (decoder vocabulary 2 + 4 + 6 = 12 by default); bert: a tiny BERT as the encoder (the path
    all-MiniLM-L6-v2 takes); options: cart_config's (fine_fusion, level_softmax)."""
    torch.manual_seed(seed)
    config = cart_config(text_vocab_size=50, level_sizes=list(levels), fusion=fusion, dropout_rate=dropout,
                         text_encoder=TINY_BERT if bert else None, freeze_encoder=frozen, **options, **SIZES)
    config._attn_implementation = attn
    return CartT5(config).eval()


def batch_of(input_ids, mask, labels):
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, 50, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return input_ids, mask


def sequence_log_probs(model, input_ids, mask, sequences):
    """Sum of the log-probabilities `forward` gives the tokens after the start token."""
    logits = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=sequences[:, :-1]).logits
    return logits.log_softmax(-1).gather(-1, sequences[:, 1:, None]).squeeze(-1).sum(-1)


def test_fusion_replaces_every_cross_attention_and_the_switch_turns_it_off():
    fused, plain = tiny_model(True), tiny_model(False)
    assert all(isinstance(b.layer[1], FusedCrossAttention) for b in fused.decoder.block)
    assert not any(isinstance(b.layer[1], FusedCrossAttention) for b in plain.decoder.block)
    assert isinstance(fused.encoder, LayerFusionEncoder) and hasattr(fused.encoder, "coarse_projection")
    assert not hasattr(plain.encoder, "coarse_projection")
    input_ids, mask = padded_batch()
    memory = fused.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    assert memory.shape == (3, (3 + 1) * 6, 16)  # [Z; E1; E2; E3]
    assert plain.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state.shape == (3, 6, 16)
    assert fused.lm_head.out_features == 12 and fused.get_input_embeddings().num_embeddings == 50


def test_fused_memory_is_the_projection_of_all_normalised_layers_then_the_layers():
    model = tiny_model(True)
    input_ids, mask = padded_batch()
    stack = super(LayerFusionEncoder, model.encoder).forward(input_ids=input_ids, attention_mask=mask,
                                                             output_hidden_states=True, return_dict=True)
    raw = stack.hidden_states  # (embeddings, E1 raw, E2 raw, E3 normalised)
    layers = [model.encoder.final_layer_norm(h) for h in raw[1:3]] + [stack.last_hidden_state]
    assert torch.allclose(model.encoder.final_layer_norm(raw[-1]), stack.last_hidden_state, atol=1e-5)
    memory = model.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    expected_z = torch.cat(layers, -1) @ model.encoder.coarse_projection.weight.T + model.encoder.coarse_projection.bias
    assert torch.allclose(memory[:, :6], expected_z, atol=1e-5)
    for i, layer in enumerate(layers):
        assert torch.allclose(memory[:, 6 * (i + 1): 6 * (i + 2)], layer, atol=1e-6)


def test_fine_fusion_mixes_one_attention_per_layer_with_softmax_alpha():
    model = tiny_model(True)
    block = model.decoder.block[0].layer[1]
    block.alpha.data = torch.tensor([0.3, -1.0, 2.0])
    h = torch.randn(2, 3, 16)
    memory = torch.randn(2, 4 * 5, 16)
    out, _, _ = block(h, key_value_states=memory)
    normed = block.layer_norm(h)
    coarse = block.coarse(normed, key_value_states=memory[:, :5])[0]
    coarse = coarse * torch.sigmoid(block.gate(coarse))
    weights = torch.softmax(block.alpha, 0)
    fine = sum(w * block.fine(normed, key_value_states=memory[:, 5 * (i + 1): 5 * (i + 2)])[0]
               for i, w in enumerate(weights))
    assert torch.allclose(out, h + coarse + fine, atol=1e-5)


@pytest.mark.parametrize("fusion", [True, False])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("bert", [False, True])
def test_forward_and_cached_beam_search_give_the_same_scores(fusion, attn, bert):
    model = tiny_model(fusion, attn=attn, bert=bert)
    input_ids, mask = padded_batch()
    # pad and EOS suppressed so every beam runs 4 steps (beam search scores the unnormalised log-probs)
    out = model.generate(input_ids=input_ids, attention_mask=mask, num_beams=4, num_return_sequences=4,
                         max_new_tokens=4, length_penalty=0.0, do_sample=False, use_cache=True, suppress_tokens=[0, 1],
                         output_scores=True, return_dict_in_generate=True)
    expected = sequence_log_probs(model, input_ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), out.sequences)
    assert torch.allclose(expected, out.sequences_scores, atol=1e-4)
    uncached = model.generate(input_ids=input_ids, attention_mask=mask, num_beams=4, num_return_sequences=4,
                              max_new_tokens=4, length_penalty=0.0, do_sample=False, use_cache=False,
                              suppress_tokens=[0, 1])
    assert torch.equal(uncached, out.sequences)


def test_beam_search_projects_the_memory_once_a_query_and_training_every_forward():
    model = tiny_model(True)
    input_ids, mask = padded_batch()
    calls, rows = [], []
    for block in model.decoder.block:
        for attention in (block.layer[1].coarse, block.layer[1].fine):
            attention.k.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    model.decoder.block[0].layer[0].SelfAttention.q.register_forward_hook(lambda m, i, o: rows.append(len(i[0])))
    with torch.no_grad():
        model.generate(input_ids=input_ids, attention_mask=mask, num_beams=4, max_new_tokens=4, do_sample=False,
                       suppress_tokens=[0, 1])
    # 2 layers x (coarse, fine), once for the 4 steps, on the 3 queries' memories, not on a copy a beam
    assert calls == [3, 3] * 2
    assert rows == [3, 12, 12, 12]  # the first step's 4 beams of a query are one start token: decoded once
    calls.clear()
    model.train()
    for _ in range(2):
        model(input_ids=input_ids, attention_mask=mask, labels=torch.tensor([[3, 5, 1]] * 3)).loss.backward()
    assert len(calls) == 2 * 2 * 2 and all(b.layer[1]._memo is None for b in model.decoder.block)


@pytest.mark.parametrize("fusion", [True, False])
def test_padding_does_not_change_the_output(fusion):
    model = tiny_model(fusion)
    input_ids, mask = padded_batch()
    decoder_input = torch.tensor([[0, 3, 5, 7]] * 3)
    padded = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_input).logits
    alone = model(input_ids=input_ids[1:2, :4], decoder_input_ids=decoder_input[:1]).logits
    assert torch.allclose(padded[1:2], alone, atol=1e-5)


def test_initialisation_follows_t5_rules_and_fan_in_for_new_layers():
    model = tiny_model(True)
    d = 16
    q = model.encoder.block[0].layer[0].SelfAttention.q.weight
    assert 0.5 < q.std().item() * (d * 8) ** 0.5 < 1.5  # T5: std (d_model * d_kv) ** -0.5
    for layer in (model.lm_head, model.encoder.coarse_projection, model.decoder.block[1].layer[1].gate):
        assert 0.5 < layer.weight.std().item() * layer.in_features ** 0.5 < 1.5
    assert torch.equal(model.decoder.block[0].layer[1].alpha, torch.zeros(3))


def test_a_bert_encoder_feeds_all_its_layers_to_fusion_and_can_be_frozen():
    model = tiny_model(True, bert=True)
    input_ids, mask = padded_batch()
    hidden = model.encoder.bert(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
    memory = model.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    layers = list(hidden[1:])  # BERT's layer outputs, each already layer-normalised
    assert memory.shape == (3, 4 * 6, 16)
    assert torch.allclose(memory[:, 6:], torch.cat(layers, dim=1), atol=1e-6)
    assert torch.allclose(memory[:, :6], model.encoder.coarse_projection(torch.cat(layers, -1)), atol=1e-6)
    assert model.get_input_embeddings() is model.encoder.bert.embeddings.word_embeddings
    frozen = tiny_model(True, bert=True, frozen=True, dropout=0.1).train()
    labels = torch.tensor([[3, 5, 7, 1]] * 3)
    loss = cart_loss(frozen, batch_of(input_ids, mask, labels), omega=1.0)
    loss.total.backward()
    assert all(p.grad is None for p in frozen.encoder.bert.parameters())
    assert frozen.encoder.coarse_projection.weight.grad is not None and not frozen.encoder.bert.training
    deterministic = tiny_model(True, bert=True, frozen=True).train()  # no dropout anywhere: the passes agree
    once = cart_loss(deterministic, batch_of(input_ids, mask, labels), omega=1.0)  # the frozen encoder ran once
    twice = deterministic(input_ids=input_ids.repeat(2, 1), attention_mask=mask.repeat(2, 1), labels=labels.repeat(2, 1))
    assert torch.allclose(once.cross_entropy, twice.loss, atol=1e-6) and once.kl.abs().item() < 1e-6
    with pytest.raises(ValueError, match="d_model=8 must equal the text encoder's width 16"):
        cart_config(text_vocab_size=50, level_sizes=[4, 6], fusion=True, text_encoder=TINY_BERT, d_model=8)


@pytest.mark.parametrize("bert, options", [(False, {}), (True, {}),
                                           (True, {"level_softmax": True, "geometry_dim": 16, "fine_fusion": False})])
def test_save_and_load_round_trip(tmp_path, bert, options):
    model = tiny_model(True, bert=bert, **options)
    if options:
        model.geometry.data.normal_()
    model.save_pretrained(tmp_path / "m")
    loaded = CartT5.from_pretrained(tmp_path / "m", local_files_only=True).eval()
    input_ids, mask = padded_batch()
    decoder_input = torch.tensor([[0, 3, 5]] * 3)
    assert loaded.config.cart_fusion and loaded.config.decoder_vocab_size == 12
    assert torch.allclose(model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_input).logits,
                          loaded(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_input).logits)


def test_from_t5_keeps_the_pretrained_layers_and_adds_the_new_ones(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=40, **SIZES))
    t5.save_pretrained(tmp_path / "t5")
    model = CartT5.from_t5(tmp_path / "t5", level_sizes=[3, 4], fusion=True, dropout=0.0)
    assert torch.equal(model.encoder.embed_tokens.weight, t5.shared.weight)
    assert torch.equal(model.encoder.block[1].layer[0].SelfAttention.q.weight, t5.encoder.block[1].layer[0].SelfAttention.q.weight)
    pretrained_cross = t5.decoder.block[0].layer[1].EncDecAttention.q.weight
    assert torch.equal(model.decoder.block[0].layer[1].coarse.q.weight, pretrained_cross)
    assert torch.equal(model.decoder.block[0].layer[1].fine.q.weight, pretrained_cross)
    assert model.lm_head.out_features == 9 and model.decoder.embed_tokens.num_embeddings == 9


@pytest.mark.parametrize("fusion", [True, False])
def test_rdrop_kl_is_zero_without_dropout_and_positive_with_it(fusion):
    input_ids, mask = padded_batch()
    labels = torch.tensor([[3, 5, 8, 1], [2, 6, 9, 1], [4, 7, 10, -100]])
    no_dropout = tiny_model(fusion, dropout=0.0).train()
    loss = cart_loss(no_dropout, batch_of(input_ids, mask, labels), omega=1.0)
    assert loss.kl.abs().item() < 1e-6
    assert torch.allclose(loss.total, loss.cross_entropy)
    assert torch.allclose(loss.cross_entropy, no_dropout(input_ids=input_ids, attention_mask=mask, labels=labels).loss, atol=1e-6)
    dropout = tiny_model(fusion, dropout=0.3).train()
    loss = cart_loss(dropout, batch_of(input_ids, mask, labels), omega=2.0)
    assert loss.kl.item() > 1e-4
    assert torch.allclose(loss.total, loss.cross_entropy + 2.0 * loss.kl)
    off = cart_loss(dropout, batch_of(input_ids, mask, labels), omega=0.0)  # "w/o consistency": one pass, CE only
    assert off.kl.item() == 0 and torch.equal(off.total, off.cross_entropy)


def test_example_weights_scale_each_examples_share_of_the_cross_entropy():
    input_ids, mask = padded_batch()
    labels = torch.tensor([[3, 5, 8, 1], [2, 6, 9, 1], [4, 7, 10, -100]])
    model = tiny_model()

    def loss(*weights):
        batch = batch_of(input_ids, mask, labels)
        if weights:
            batch["weights"] = torch.tensor(weights)
        return cart_loss(model, batch, omega=0.0).cross_entropy

    assert torch.allclose(loss(1.0, 1.0, 1.0), loss(), atol=1e-6)
    parts = [loss(1.0, 0.0, 0.0), loss(0.0, 1.0, 0.0), loss(0.0, 0.0, 1.0)]
    assert all(part > 0 for part in parts) and torch.allclose(sum(parts), loss(), atol=1e-6)
    assert torch.allclose(loss(1.0, 1.0, 0.5), loss() - parts[2] / 2, atol=1e-6)


def test_soft_labels_give_the_cross_entropy_toward_each_levels_distribution():
    # levels (4, 6): level 0 is tokens 2-5, level 1 tokens 6-11; the level softmax gives other tokens no mass
    model = tiny_model(level_softmax=True)
    input_ids, mask = padded_batch()
    labels = torch.tensor([[2, 6, 1], [3, 7, 1], [4, 8, 1]])
    other = torch.tensor([[5, 11, 1], [2, 9, 1], [3, 6, 1]])
    onehot = lambda rows: torch.nn.functional.one_hot(rows, 12).float()

    def loss(soft=None, **extra):
        batch = batch_of(input_ids, mask, labels) | extra | ({} if soft is None else {"soft_labels": soft})
        return cart_loss(model, batch, omega=0.0).cross_entropy

    hard = loss()
    assert torch.allclose(loss(onehot(labels)), hard, atol=1e-6)
    weights = torch.tensor([1.0, 0.5, 0.0])
    assert torch.allclose(loss(onehot(labels), weights=weights), loss(weights=weights), atol=1e-6)
    # linear in the targets: 0.7 / 0.3 between two identifiers' tokens is that mix of their cross-entropies
    mixed = loss(0.7 * onehot(labels) + 0.3 * onehot(other))
    assert torch.isfinite(mixed) and torch.allclose(mixed, 0.7 * hard + 0.3 * loss(onehot(other)), atol=1e-5)


@pytest.mark.parametrize("bert", [False, True])
def test_ranking_loss_is_a_softmax_over_whole_identifier_log_probabilities(bert):
    # levels (4, 6): level 0 is tokens 2-5, level 1 tokens 6-11, then EOS (1)
    model = tiny_model(True, bert=bert, frozen=bert, level_softmax=True).train()  # no dropout: passes agree
    input_ids, mask = padded_batch()
    labels = torch.tensor([[2, 6, 1], [3, 7, 1], [4, 8, 1]])
    negatives = torch.tensor([[[3, 7, 1], [5, 11, 1]], [[2, 6, 1], [4, 9, 1]], [[5, 10, 1], [2, 6, 1]]])  # (B, 2, L)
    batch = batch_of(input_ids, mask, labels) | {"negatives": negatives}
    loss = cart_loss(model, batch, omega=0.0, rank_weight=0.5)
    with_start = lambda rows: torch.cat([torch.zeros(len(rows), 1, dtype=torch.long), rows], dim=1)
    scores = torch.stack([sequence_log_probs(model, input_ids, mask, with_start(rows))
                          for rows in (labels, negatives[:, 0], negatives[:, 1])], dim=1)
    assert torch.allclose(loss.rank, torch.nn.functional.cross_entropy(scores, torch.zeros(3, dtype=torch.long)),
                          atol=1e-5)
    assert torch.allclose(loss.cross_entropy, model(input_ids=input_ids, attention_mask=mask, labels=labels).loss,
                          atol=1e-6)
    assert torch.allclose(loss.total, loss.cross_entropy + 0.5 * loss.rank)
    both = cart_loss(model, batch, omega=1.0, rank_weight=0.5)  # with R-Drop's second pass as well
    assert torch.allclose(both.rank, loss.rank, atol=1e-5) and both.kl.abs().item() < 1e-6
    off = cart_loss(model, batch, omega=0.0, rank_weight=0.0)  # the negatives are not run
    assert off.rank.item() == 0 and torch.equal(off.total, off.cross_entropy)


def small_trie(seed=0, n=20, sizes=(3, 4, 4, 5)):
    """A trie of n random identifiers; `trie.tokens[i]` are item i's tokens."""
    rng = np.random.default_rng(seed)
    layout = TokenLayout(list(sizes))
    codes = np.unique(np.stack([rng.integers(0, s, 4 * n) for s in sizes], 1), axis=0)[:n]
    trie = PrefixTrie(layout.to_tokens(codes), layout)
    trie.tokens = layout.to_tokens(codes)
    return trie


@pytest.mark.parametrize("beams", [2, 6, 16])
def test_constrained_beam_search_only_emits_real_identifiers(beams):
    trie = small_trie()
    model = tiny_model(True, levels=trie.layout.level_sizes)
    input_ids, mask = padded_batch()
    items, scores = decode(model, input_ids, mask, trie, beams=beams, top_k=beams)
    valid = items >= 0
    assert valid[:, 0].all()  # at least one real identifier per query
    assert torch.isfinite(scores[valid]).all() and not torch.isnan(scores).any()
    assert (scores[~valid] == float("-inf")).all()
    for row_items, row_scores in zip(items, scores):
        real = row_items[row_items >= 0]
        assert len(set(real.tolist())) == len(real)  # no identifier twice
        assert torch.all(row_scores[:-1] >= row_scores[1:])  # best first


def test_trie_constraint_masks_to_the_allowed_tokens_and_lets_dead_beams_end():
    trie = small_trie()
    constraint = TrieConstraint(trie)
    first = int(trie.level_keys[0][0] % trie.vocab)  # a valid first token
    input_ids = torch.tensor([[0, int(first)], [0, 1]])  # row 1 left the trie (EOS as a first token)
    scores = constraint(input_ids, torch.zeros(2, trie.vocab))
    allowed = trie.allowed_mask(input_ids[:1, 1:])
    assert torch.equal(torch.isfinite(scores[0]), allowed[0])
    assert torch.isfinite(scores[1]).nonzero().flatten().tolist() == [TokenLayout.EOS]
    wider = constraint(input_ids, torch.zeros(2, trie.vocab + 5))  # an output layer with extra tokens
    assert torch.equal(wider[:, : trie.vocab], scores) and torch.isinf(wider[:, trie.vocab:]).all()
    with pytest.raises(ValueError, match="top_k=5 is larger than the beam width 4"):
        decode(tiny_model(True, levels=trie.layout.level_sizes), *padded_batch(), trie, beams=4, top_k=5)


@pytest.mark.parametrize("bert", [False, True])
def test_coarse_fusion_alone_reads_z_only_and_agrees_in_forward_and_beam_search(bert):
    model = tiny_model(True, bert=bert, fine_fusion=False)
    input_ids, mask = padded_batch()
    memory = model.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    assert memory.shape == (3, 6, 16) and model.sources == 0  # [Z] alone
    assert not hasattr(model.decoder.block[0].layer[1], "fine")
    out = model.generate(input_ids=input_ids, attention_mask=mask, num_beams=4, num_return_sequences=4,
                         max_new_tokens=4, length_penalty=0.0, do_sample=False, suppress_tokens=[0, 1],
                         output_scores=True, return_dict_in_generate=True)
    expected = sequence_log_probs(model, input_ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), out.sequences)
    assert torch.allclose(expected, out.sequences_scores, atol=1e-4)


@pytest.mark.parametrize("geometry", [0, 16])
def test_level_softmax_spends_each_position_on_its_own_level(geometry):
    trie = small_trie()
    model = tiny_model(True, levels=trie.layout.level_sizes, level_softmax=True, dropout=0.1, geometry_dim=geometry)
    if geometry:
        model.geometry.data.normal_()
    input_ids, mask = padded_batch()
    labels = torch.from_numpy(trie.layout.to_tokens(np.array([[0, 1, 2, 3], [2, 3, 0, 4], [1, 0, 3, 2]])))
    labels = torch.cat([labels, torch.ones(3, 1, dtype=torch.long)], dim=1)  # + EOS
    logits = model(input_ids=input_ids, attention_mask=mask, labels=labels).logits  # (3, 5, V)
    probabilities = logits.softmax(-1)
    for level in range(4):
        start, end = trie.layout.level_range(level)
        assert torch.allclose(probabilities[:, level, start:end].sum(-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(probabilities[:, 4, 1], torch.ones(3))  # after the identifier: EOS alone
    model.train()
    loss = cart_loss(model, batch_of(input_ids, mask, labels), omega=1.0)  # R-Drop's KL stays finite
    assert torch.isfinite(loss.total) and loss.kl.item() > 0
    model.eval()
    items, scores = decode(model, input_ids, mask, trie, beams=6, top_k=3)
    assert (items >= 0).all()
    # a returned score is the identifier's log-probability under the level-normalised softmax (decoding
    # scores each step's level alone and skips the EOS step, whose log-probability is 0)
    identifiers = torch.from_numpy(trie.tokens[items.flatten().numpy()])
    sequences = torch.cat([torch.zeros(9, 1, dtype=torch.long), identifiers, torch.ones(9, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        expected = sequence_log_probs(model, input_ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), sequences)
    assert torch.allclose(expected.view(3, 3), scores, atol=1e-4)


@pytest.mark.parametrize("fusion, bert", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("beams, top_k", [(1, 1), (6, 3), (24, 24)])  # 24 beams: more than the 20 identifiers
def test_our_level_beam_search_finds_what_generate_finds(fusion, bert, beams, top_k):
    trie = small_trie()
    torch.manual_seed(0)
    model = tiny_model(fusion, bert=bert, levels=trie.layout.level_sizes, level_softmax=True,
                       geometry_dim=16 if bert else 0)
    if bert:
        model.geometry.data.normal_()
    input_ids, mask = padded_batch()
    items, scores = decode(model, input_ids, mask, trie, beams=beams, top_k=top_k)  # ours: level softmax
    expected_items, expected_scores = decode(model, input_ids, mask, trie, beams=beams, top_k=top_k,
                                             constraint=TrieConstraint(trie))  # transformers' generate
    assert torch.equal(items, expected_items)
    assert torch.equal(torch.isinf(scores), torch.isinf(expected_scores))
    assert torch.allclose(scores[items >= 0], expected_scores[items >= 0], rtol=1e-5, atol=1e-5)
    if beams == 24:
        assert ((items >= 0).sum(1) == 20).all()  # every identifier, the rest empty


class Tokenized(dict):
    def to(self, device):
        return self


@pytest.mark.parametrize("fusion, level_softmax", [(True, True), (False, True), (True, False), (False, False)])
def test_scoring_any_identifier_gives_beam_search_scores(fusion, level_softmax):
    trie = small_trie()
    torch.manual_seed(0)
    model = tiny_model(fusion, levels=trie.layout.level_sizes, level_softmax=level_softmax)
    input_ids, mask = padded_batch()
    items, scores = decode(model, input_ids, mask, trie, beams=6, top_k=6)
    tokenizer = lambda texts, **kwargs: Tokenized(input_ids=input_ids, attention_mask=mask)  # the batch as "texts"
    every = score_identifiers(model, tokenizer, ["a", "b", "c"], trie.tokens, max_tokens=6, device="cpu", chunk=7)
    assert every.shape == (3, len(trie.tokens))
    for q in range(3):  # chunks of 7 candidates, per-row memory without fusion: the same numbers
        found = items[q] >= 0
        assert np.allclose(every[q, items[q][found].numpy()], scores[q][found].numpy(), atol=1e-4)
    # each query its own candidates: the same numbers as every candidate under every query
    own = np.array([[0, 5], [2, 2], [len(trie.tokens) - 1, 1]])
    mine = score_identifiers(model, tokenizer, ["a", "b", "c"], trie.tokens[own], max_tokens=6, device="cpu", chunk=1)
    assert np.allclose(mine, np.take_along_axis(every, own, axis=1), atol=1e-4)


def test_cached_layer_outputs_give_the_same_loss_as_the_encoder():
    model = tiny_model(True, bert=True, frozen=True).train()
    input_ids, mask = padded_batch()
    labels = torch.tensor([[3, 7, 1]] * 3)
    layers = model.encoder.layer_outputs(input_ids, mask)  # (B, T, S, d)
    assert layers.shape == (3, 6, 3, 16)
    direct = cart_loss(model, batch_of(input_ids, mask, labels), omega=1.0)
    cached = cart_loss(model, {"encoder_layers": layers, "attention_mask": mask, "labels": labels}, omega=1.0)
    assert torch.allclose(direct.total, cached.total, atol=1e-6)


def test_residual_means_are_cluster_means_then_mean_residuals():
    rng = np.random.default_rng(0)
    layout = TokenLayout([3, 4])
    codes = np.stack([rng.integers(0, 3, 40), rng.integers(0, 4, 40)], 1)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    geometry = residual_means(codes, layout, x)
    tokens = layout.to_tokens(codes)
    for c in range(3):
        assert np.allclose(geometry[tokens[codes[:, 0] == c, 0][0]], x[codes[:, 0] == c].mean(0), atol=1e-5)
    residual = x - geometry[tokens[:, 0]]
    for c in range(4):
        assert np.allclose(geometry[tokens[codes[:, 1] == c, 1][0]], residual[codes[:, 1] == c].mean(0), atol=1e-5)
    assert not geometry[: TokenLayout.SPECIAL].any()
    unique = TokenLayout([40])  # one token an item: the geometry rebuilds every embedding exactly
    assert np.allclose(residual_means(np.arange(40)[:, None], unique, x)[unique.to_tokens(np.arange(40)[:, None])[:, 0]], x,
                       atol=1e-6)


def test_identifier_geometry_starts_each_query_at_the_dense_score_of_the_rebuilt_items():
    trie = small_trie()
    model = tiny_model(True, bert=True, levels=trie.layout.level_sizes, level_softmax=True, geometry_dim=16)
    model.lm_head.weight.data.zero_()  # the learned part silent: the geometry alone scores
    x = np.random.default_rng(1).normal(size=(len(trie.tokens), 16)).astype(np.float32)
    model.geometry.data.copy_(torch.from_numpy(residual_means(trie.layout.to_codes(trie.tokens), trie.layout, x)))
    input_ids, mask = padded_batch()
    items, scores = decode(model, input_ids, mask, trie, beams=20, top_k=20)  # 20 beams, 20 items: exhaustive
    last = model.encoder.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state
    pooled = (last * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    q = torch.nn.functional.normalize(pooled, dim=-1)
    rebuilt = model.geometry[torch.from_numpy(trie.tokens)].sum(1)  # (items, 16)
    dense = (model.geometry_scale * q @ rebuilt.T).detach()  # (3, items)
    for row in range(3):  # the order is the dense order; the scores differ from it by one constant per query
        assert torch.equal(items[row], dense[row].argsort(descending=True))
        gap = scores[row] - dense[row][items[row]]
        assert torch.allclose(gap, gap[0].expand_as(gap), atol=1e-4)


def test_tuned_top_layers_run_again_with_gradients_from_the_frozen_layer_below():
    model = tiny_model(True, bert=True, frozen=True, tune_layers=1)
    encoder = model.encoder
    input_ids, mask = padded_batch()
    cached = encoder.layer_outputs(input_ids, mask)  # not tuning yet: the frozen model's layers, as cached
    encoder.tuning = True
    model.eval()  # no dropout: both paths must agree
    direct = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    from_cache = encoder(layers=cached, attention_mask=mask).last_hidden_state
    assert torch.allclose(direct, from_cache, atol=1e-5)
    model.train()
    assert encoder.bert.encoder.layer[-1].training and not encoder.bert.encoder.layer[0].training
    labels = torch.tensor([[3, 7, 1]] * 3)
    cart_loss(model, {"encoder_layers": cached, "attention_mask": mask, "labels": labels}, omega=0.0).total.backward()
    assert all(p.grad is not None for p in encoder.bert.encoder.layer[-1].parameters())
    assert all(p.grad is None for p in encoder.bert.encoder.layer[0].parameters())
    assert all(p.grad is None for p in encoder.bert.embeddings.parameters())
