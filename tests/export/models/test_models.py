"""Behaviour of the PyTorch heads and towers: the reference quirks are fixed."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from clipmatch.manifest import HeadsConfig  # noqa: E402
from clipmatch_export.models.dcsm import DenseCosineScorer  # noqa: E402
from clipmatch_export.models.heads import build_heads  # noqa: E402
from clipmatch_export.models.mmae import EntityHeads  # noqa: E402

CFG = HeadsConfig(embed_dim=16, num_image_tokens=5, num_experts=2, dcsm_text_length=6)


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return x / x.norm(dim=-1, keepdim=True)


def masks(lengths, width):
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()


def dcsm_batch(n=4, seed=0):
    mask = masks([6, 4, 2, 5][:n], 6)
    functional = torch.zeros(n, 6, dtype=torch.long)
    functional[0, 2] = 1  # "above" at position 2
    functional[1, 1] = 7  # "not"
    return unit(n, 5, 16, seed=seed), unit(n, 6, 16, seed=seed + 1) * mask[..., None], mask, functional


def test_dcsm_score_does_not_depend_on_batch_neighbours():
    scorer = build_heads(CFG, seed=1).dcsm
    img, txt, mask, func = dcsm_batch()
    with torch.no_grad():
        together = scorer(img, txt, mask, func)
        alone = torch.stack([scorer(img[i:i + 1], txt[i:i + 1], mask[i:i + 1], func[i:i + 1])[0] for i in range(4)])
        # Replace every neighbour of row 0 with something else: row 0's score must not move.
        img2, txt2, mask2, func2 = dcsm_batch(seed=10)
        img2[0], txt2[0], mask2[0], func2[0] = img[0], txt[0], mask[0], func[0]
        other = scorer(img2, txt2, mask2, func2)
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)
    assert abs(other[0] - together[0]) < 1e-6


def test_dcsm_functional_columns_are_learned_and_placed_at_the_word():
    scorer = DenseCosineScorer(CFG)
    img, txt, mask, func = dcsm_batch()
    dense = scorer.dense_map(img, txt, mask, func)
    # Column 2 of row 0 is functional word 0's learned vector, column 1 of row 1 is word 6's.
    torch.testing.assert_close(dense[0, :, 2], scorer.functional_columns[0])
    torch.testing.assert_close(dense[1, :, 1], scorer.functional_columns[6])
    # Padding columns are zeros; real ordinary cells are z-scored per map.
    assert torch.all(dense[2, :, 2:] == 0)
    cells = dense[3, :, :5].detach()
    assert abs(float(cells.mean())) < 1e-5 and abs(float(cells.std(unbiased=False)) - 1) < 1e-3
    # The table gets gradient, so an optimiser trains it (the reference never did).
    scorer(img, txt, mask, func).sum().backward()
    grad = scorer.functional_columns.grad
    assert grad is not None and grad[0].abs().sum() > 0 and grad[6].abs().sum() > 0
    assert grad[1].abs().sum() == 0  # word 1 appears nowhere in the batch


def test_the_heatmaps_numpy_map_is_the_dcsms_own_map():
    """The SDK draws the map the DCSM scores: same z-score, real ordinary cells equal."""
    from clipmatch.retrieval.heatmap import dense_map

    scorer = DenseCosineScorer(CFG)
    img, txt, mask, func = dcsm_batch()
    with torch.no_grad():
        torch_map = scorer.dense_map(img, txt, mask, func).numpy()
    for i in range(len(mask)):
        cells = (mask[i] > 0) & (func[i] == 0)
        drawn = dense_map(img[i].numpy(), txt[i].numpy(), mask[i].numpy(), func[i].numpy())
        np.testing.assert_allclose(drawn[:, cells.numpy()], torch_map[i][:, cells.numpy()], atol=1e-5, rtol=0)


def test_dcsm_parameter_count_matches_reference_at_reference_sizes():
    scorer = DenseCosineScorer(HeadsConfig(embed_dim=512, num_image_tokens=197, dcsm_text_length=30,
                                           dcsm_scorer="cnn"))
    n = sum(p.numel() for p in scorer.parameters())
    assert 3.0e6 < n < 3.1e6, n  # "about 3M parameters at P=197, L=30"


@pytest.mark.parametrize("scorer", ["tokens", "cnn"])
def test_dcsm_scores_ignore_padding_content(scorer):
    cfg = HeadsConfig(embed_dim=16, num_image_tokens=5, num_experts=2, dcsm_text_length=6, dcsm_scorer=scorer)
    dcsm = build_heads(cfg, seed=2).dcsm
    img, txt, mask, func = dcsm_batch()
    noisy = txt + unit(*txt.shape, seed=9) * (1 - mask[..., None])  # garbage where the mask says padding
    with torch.no_grad():
        torch.testing.assert_close(dcsm(img, txt, mask, func), dcsm(img, noisy, mask, func), atol=1e-6, rtol=0)


def test_dcsm_token_reader_places_a_word_where_its_column_peaks():
    from clipmatch_export.models.dcsm import MapTokenReader

    cfg = HeadsConfig(embed_dim=16, num_image_tokens=1 + 3 * 3, dcsm_text_length=2)
    reader = MapTokenReader(cfg)
    dense = torch.zeros(1, 10, 2)
    dense[0, 1 + 3, 0] = 5.0  # word 0 lights the left patch of the middle row
    dense[0, 1 + 5, 1] = 5.0  # word 1 the right one
    attend = torch.softmax(dense[:, 1:, :] * reader.log_sharpness.exp(), dim=1)
    centre = torch.einsum("bpl,pk->blk", attend, reader.coords)
    assert centre[0, 0, 0] < -0.5 and centre[0, 1, 0] > 0.5  # x: left vs right
    assert abs(float(centre[0, 0, 1].detach())) < 1e-6  # y: middle row


def test_heads_config_refuses_a_token_reader_without_a_square_grid():
    with pytest.raises(ValueError, match="square patch grid"):
        HeadsConfig(embed_dim=16, num_image_tokens=6)
    assert HeadsConfig(embed_dim=16, num_image_tokens=6, dcsm_scorer="cnn").num_image_tokens == 6


def entity_batch(n=3, t=7, e=5, seed=0):
    text_mask = masks([7, 4, 3][:n], t)
    expl_mask = masks([5, 2, 4][:n], e)
    return (unit(n, 5, 16, seed=seed), unit(n, t, 16, seed=seed + 1) * text_mask[..., None], text_mask,
            unit(n, e, 16, seed=seed + 2) * expl_mask[..., None], expl_mask)


def test_expert_outputs_ignore_padding_content():
    heads = build_heads(CFG, seed=2).entity
    img, txt, tm, exp, em = entity_batch()
    noisy_txt, noisy_exp = txt.clone(), exp.clone()
    noisy_txt[tm == 0] = 5.0  # garbage where the masks say padding
    noisy_exp[em == 0] = -3.0
    with torch.no_grad():
        a = heads(img, txt, tm, exp, em)
        b = heads(img, noisy_txt, tm, noisy_exp, em)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def full_block(expert, x, y, y_mask):
    """The spec's pre-LN block over every position: x <- x + Attn(LN(x), LN(y)); x <- x + MLP(LN(x))."""
    h = x + expert.attn(expert.ln_attn(x), expert.ln_attn(y), y_mask)
    return h + expert.mlp(expert.ln_mlp(h))


def test_text_experts_read_each_texts_own_eot():
    experts = build_heads(CFG, seed=3).entity.experts
    img, txt, tm, exp, em = entity_batch()
    eot = tm.sum(1) - 1  # 6, 3, 2: a different position in every row
    with torch.no_grad():
        out = experts(img, txt, tm, exp, em)
        for k, expert in enumerate(experts.text):
            # The single-row read-out equals the whole block read at each text's own EOT.
            want = full_block(expert, txt, txt, tm)[torch.arange(3), eot]
            torch.testing.assert_close(out.text_experts[:, k], want, atol=1e-5, rtol=0)
        for k, expert in enumerate(experts.explanation):
            torch.testing.assert_close(out.text_experts[:, 2 + k],
                                       full_block(expert, txt, exp, em)[torch.arange(3), eot], atol=1e-5, rtol=0)
            torch.testing.assert_close(out.image_experts[:, 2 + k], full_block(expert, img, exp, em)[:, 0],
                                       atol=1e-5, rtol=0)
        for k, expert in enumerate(experts.vision):
            torch.testing.assert_close(out.image_experts[:, k], full_block(expert, img, img, None)[:, 0],
                                       atol=1e-5, rtol=0)
    for i, n in enumerate(tm.sum(1).tolist()):
        torch.testing.assert_close(out.text_cls[i], txt[i, n - 1])
    assert out.image_experts.shape == (3, 4, 16) and out.text_experts.shape == (3, 4, 16)
    torch.testing.assert_close(out.image_star.norm(dim=-1), torch.ones(3))


def test_explanation_changes_entity_scores_and_rows_are_independent():
    heads = EntityHeads(CFG).eval()
    img, txt, tm, exp, em = entity_batch()
    exp2, em2 = entity_batch(seed=20)[3:]
    with torch.no_grad():
        p1, s1 = heads(img, txt, tm, exp, em)
        p2, s2 = heads(img, txt, tm, exp2, em2)
        p_alone, _ = heads(img[:1], txt[:1], tm[:1], exp[:1], em[:1])
    assert not torch.allclose(p1, p2) and not torch.allclose(s1, s2)
    assert torch.all((p1 > 0) & (p1 < 1))
    torch.testing.assert_close(p_alone, p1[:1], atol=1e-6, rtol=0)


def test_towers_pool_the_token_they_return(tiny_model_dir):
    from transformers import CLIPModel

    from clipmatch_export.models.towers import ImageTower, TextTower

    clip = CLIPModel.from_pretrained(str(tiny_model_dir)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[0, 5, 6, 7, 1], [0, 9, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        img_embeds, img_tokens = ImageTower(clip)(pixels)
        txt_embeds, txt_tokens = TextTower(clip)(ids, mask)
        # The same vectors transformers' CLIP gives, normalised.
        hf_img = clip.get_image_features(pixel_values=pixels)
        hf_txt = clip.get_text_features(input_ids=ids, attention_mask=mask)
    hf_img = getattr(hf_img, "pooler_output", hf_img)
    hf_txt = getattr(hf_txt, "pooler_output", hf_txt)
    torch.testing.assert_close(img_embeds, torch.nn.functional.normalize(hf_img, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(txt_embeds, torch.nn.functional.normalize(hf_txt, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(img_embeds, img_tokens[:, 0])
    torch.testing.assert_close(txt_embeds[1], txt_tokens[1, 2])
    assert torch.all(txt_tokens[1, 3:] == 0)
    np.testing.assert_allclose(img_tokens.norm(dim=-1).numpy(), 1, atol=1e-5)


def test_pairwise_scoring_equals_row_aligned_rows():
    """The training shortcut (one-sided experts once per image / text) gives the served rows' values."""
    experts = build_heads(CFG, seed=4).entity.experts
    img, txt, tm, exp, em = entity_batch()
    ii = torch.tensor([0, 0, 1, 2, 2, 1])
    jj = torch.tensor([0, 2, 1, 0, 1, 2])
    with torch.no_grad():
        fast = experts(img, txt, tm, exp, em, pairs=(ii, jj))
        slow = experts(img[ii], txt[jj], tm[jj], exp[jj], em[jj])
    for name in ("image_cls", "text_cls", "image_experts", "text_experts", "image_star", "text_star"):
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [1, 7])
@pytest.mark.parametrize("explained", [True, False])
def test_split_entity_heads_equal_the_unsplit_module(k, explained):
    """Image part per image, query part once, pair part over K candidates: EntityHeads' numbers."""
    from clipmatch_export.models.mmae import EntityImage, EntityPair, EntityQuery

    heads = build_heads(CFG, seed=3).entity
    image_tokens = unit(k, 5, 16, seed=4)
    text_mask = masks([4], 6)  # padding in the text
    text = unit(1, 6, 16, seed=5) * text_mask[..., None]
    if explained:
        expl_mask = masks([3], 5)  # and in the explanation
        expl = unit(1, 5, 16, seed=6) * expl_mask[..., None]
    else:  # the query stands in for its own explanation
        expl, expl_mask = text, text_mask
    with torch.no_grad():
        want = heads(image_tokens, text.expand(k, -1, -1), text_mask.expand(k, -1), expl.expand(k, -1, -1),
                     expl_mask.expand(k, -1))
        vision = EntityImage(heads)(image_tokens)
        query = EntityQuery(heads)(text, text_mask, expl, expl_mask)
        got = EntityPair(heads)(image_tokens[:, 0], vision, *query, expl_mask)
    assert vision.shape == (k, 2, 16) and query[1].shape == (1, 2, 2, 16) and query[2].shape == (1, 4, 2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scorer", ["tokens", "cnn"])
def test_dcsm_scores_a_query_cut_to_its_length_once_for_all_candidates(scorer):
    cfg = HeadsConfig(embed_dim=16, num_image_tokens=5, num_experts=2, dcsm_text_length=6, dcsm_scorer=scorer)
    dcsm = build_heads(cfg, seed=2).dcsm
    img, txt, mask, func = dcsm_batch()
    q = slice(1, 2)  # the 4-token text with "not" in it
    with torch.no_grad():
        padded = dcsm(img, txt[q].expand(4, -1, -1), mask[q].expand(4, -1), func[q].expand(4, -1))
        cut = dcsm(img, txt[q, :4], mask[q, :4], func[q, :4])  # batch 1, its own length
    torch.testing.assert_close(cut, padded, atol=1e-5, rtol=0)
