import json
import math

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import save_file

from cart import encoders
from cart.data.emoji import load_items
from cart.encoders import imagebind
from cart.errors import CartError
from cart.settings import CorpusConfig, EmbedConfig
from conftest import FIXTURES, TINY_IMAGEBIND, make_image, unit_rows

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def efficientnet():
    return encoders.EfficientNetLite0(CPU)


@pytest.fixture(scope="module")
def emoji_paths():
    return {i["id"]: i for i in load_items(CorpusConfig().cache_dir)}


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).item()


def test_efficientnet_is_deterministic_and_tells_images_apart(efficientnet, emoji_paths):
    cat, same = efficientnet.encode([emoji_paths["1f431"]]), efficientnet.encode([emoji_paths["1f431"]])
    assert cat.shape == (1, 1280)
    assert torch.equal(cat, same)
    assert not torch.allclose(cat, efficientnet.encode([emoji_paths["1f355"]]))  # pizza


def test_efficientnet_features_group_emoji_of_one_kind(efficientnet, emoji_paths):
    ids = ["1f431", "1f63a", "1f1eb-1f1f7", "1f1e9-1f1ea"]  # cat face, grinning cat, flag France, flag Germany
    cat, grinning_cat, france, germany = efficientnet.encode([emoji_paths[i] for i in ids])
    assert cosine(cat, grinning_cat) > cosine(cat, france) + 0.1
    assert cosine(france, germany) > cosine(france, grinning_cat)


@pytest.fixture(scope="module")
def tiny_imagebind(tmp_path_factory):
    imagebind_model, _ = imagebind._imagebind_package()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("imagebind") / "tiny_imagebind.pth"
    torch.save(imagebind_model.ImageBindModel(**TINY_IMAGEBIND).state_dict(), path)
    return path


def sine_wav(path, seconds=3.0, rate=22050, hz=1000.0):
    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(path, (0.5 * np.sin(2 * math.pi * hz * t)).astype(np.float32), rate)
    return path


def tiny_video(path, seconds=3, fps=8, size=(64, 48)):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = size
        for i in range(seconds * fps):
            frame = np.full((size[1], size[0], 3), i * 255 // (seconds * fps), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_imagebind_embeds_every_modality_through_the_real_loading_path(tiny_imagebind, tmp_path):
    encoder = encoders.ImageBind(str(tiny_imagebind), TINY_IMAGEBIND, CPU)
    records = [
        {"id": "a", "modality": "image", "path": str(make_image(tmp_path / "a.png", "red"))},
        {"id": "b", "modality": "audio", "path": str(sine_wav(tmp_path / "b.wav"))},
        {"id": "c", "modality": "video", "path": str(tiny_video(tmp_path / "c.mp4"))},
        {"id": "d", "modality": "image", "path": str(make_image(tmp_path / "d.png", "blue"))},
    ]
    out = encoder.encode(records)
    assert out.shape == (4, 8) and unit_rows(out)
    assert torch.allclose(out[:1], encoder.encode(records[:1]), atol=1e-6)  # batch-independent
    text = encoder.encode_text(["a red circle", "a dog barking"])
    assert text.shape == (2, 8) and unit_rows(text)


def test_imagebind_errors_name_the_problem(tiny_imagebind, tmp_path):
    with pytest.raises(CartError, match="ImageBind checkpoint not found: .*nowhere.pth"):
        encoders.ImageBind(str(tmp_path / "nowhere.pth"), {}, CPU)
    with pytest.raises(CartError, match="tiny_imagebind.pth: does not fit ImageBindModel"):
        encoders.ImageBind(str(tiny_imagebind), TINY_IMAGEBIND | {"out_embed_dim": 4}, CPU)
    with pytest.raises(CartError, match="embed.imagebind_arch: .*colour"):
        encoders.ImageBind(str(tiny_imagebind), {"colour": 3}, CPU)


def test_audio_input_matches_imagebind_shapes_and_puts_a_tone_in_its_mel_band(tmp_path):
    clips = encoders.audio_clips(str(sine_wav(tmp_path / "tone.wav", hz=1000.0)))
    assert clips.shape == (3, 1, 128, 204)
    # 3 s of audio: 2 s clips start at 0, 0.5 and 1 s, so all 200 frames are real (4 padded)
    spectrum = clips[0, 0, :, :190].mean(dim=1)
    mel_1khz = 1127 * math.log(1 + 1000 / 700)
    edges = np.linspace(1127 * math.log(1 + 20 / 700), 1127 * math.log(1 + 8000 / 700), 130)
    expected_bin = int(np.searchsorted(edges, mel_1khz)) - 1
    assert abs(int(spectrum.argmax()) - expected_bin) <= 1


def test_video_input_matches_imagebind_shapes(tmp_path):
    clips = encoders.video_clips(str(tiny_video(tmp_path / "v.mp4")))
    assert clips.shape == (15, 3, 2, 224, 224)  # 5 clips x 3 crops, 2 frames each
    # frames brighten over time: later clips are brighter than the first
    assert clips[-1].mean() > clips[0].mean()


def test_clip_starts_follow_pytorchvideo():
    assert encoders.clip_starts(10, 2, 5) == [0, 2, 4, 6, 8]
    assert encoders.clip_starts(1, 2, 3) == [0, 0, 0]  # short media: the same clip, padded


def test_precomputed_aligns_by_id(tmp_path):
    matrix = torch.arange(12, dtype=torch.float32).view(3, 4)
    save_file({"embeddings": matrix}, str(tmp_path / "e.safetensors"), metadata={"ids": json.dumps(["x", "y", "z"])})
    out = encoders.load_precomputed(str(tmp_path / "e.safetensors"), ["z", "x"])
    assert torch.equal(out, matrix[[2, 0]])
    np.save(tmp_path / "e.npy", matrix.numpy())
    assert torch.equal(encoders.load_precomputed(str(tmp_path / "e.npy"), ["a", "b", "c"]), matrix)
    (tmp_path / "e.ids.txt").write_text("c\nb\na\n")
    assert torch.equal(encoders.load_precomputed(str(tmp_path / "e.npy"), ["a", "b", "c"]), matrix.flip(0))


@pytest.mark.parametrize("setup, ids, message", [
    ("none", ["a"], "precomputed embeddings file not found"),
    ("npy", ["a", "b"], "3 rows but the corpus has 2 items"),
    ("safetensors", ["x", "w"], "no embedding for 1 corpus items, e.g. 'w'"),
    ("wrongname", ["x"], "no tensor named 'embeddings'"),
])
def test_precomputed_mismatch_errors(tmp_path, setup, ids, message):
    matrix = torch.zeros(3, 4)
    path = tmp_path / ("e.npy" if setup == "npy" else "e.safetensors")
    if setup == "npy":
        np.save(path, matrix.numpy())
    elif setup != "none":
        name = "embeddings" if setup == "safetensors" else "features"
        save_file({name: matrix}, str(path), metadata={"ids": json.dumps(["x", "y", "z"])})
    with pytest.raises(CartError, match=message):
        encoders.load_precomputed(str(path), ids)


def test_unknown_encoder_in_load():
    with pytest.raises(CartError, match="precomputed embeddings are read by load_precomputed"):
        encoders.load(EmbedConfig(encoder="precomputed"), CPU)


def test_kaldi_fbank_matches_torchaudio():
    """tests/fixtures/kaldi_fbank_reference.npy is torchaudio 2.9.1's compliance.kaldi.fbank of this signal with
    ImageBind's arguments (htk_compat, no energy, hanning, 128 bins, no dither, 25/10 ms), made on another CPU.

    Compared as mel energies, not as their logs: a float32 log of an energy near the clamp (log eps = -15.94)
    differs between CPUs by far more than 1e-3 while the energies agree to float32 precision. The bound is
    float32's own error: a triangle's weight (bin_mel - left) / delta divides a difference of mel values near
    mel(8 kHz) = 2840 by delta = 21.8, so a few ulps of a float32 log (SIMD and libm logs differ) move a weight
    by ~eps * (bins + 1) * mel_high / (mel_high - mel_low); the FFT adds ~eps * log2(n_fft). Each times the
    frame's energy bounds an energy's error. Where an energy is 100x that bound, its log must agree to 1e-2."""
    t = torch.arange(8000) / 16000
    wave = (0.3 * torch.sin(2 * math.pi * (300 + 2000 * t) * t) + 0.1 * torch.sin(2 * math.pi * 3000 * t)).float()
    reference = torch.from_numpy(np.load(FIXTURES / "kaldi_fbank_reference.npy")).double()
    ours = encoders.kaldi_fbank(wave - wave.mean(), 16000, 128).double()
    assert ours.shape == reference.shape == (48, 128)
    eps = torch.finfo(torch.float32).eps
    floor = math.log(eps)
    # triangles holding no FFT bin (the lowest ones) are the clamp in every frame, to a float32 log's ulps
    empty = ((reference - floor).abs() < 1e-5).all(0)
    assert empty.any() and ((ours[:, empty] - floor).abs() < 1e-5).all()

    def mel(hz):
        return 1127 * math.log(1 + hz / 700)

    ulps, bins, n_fft = 4, 128, 512
    condition = (bins + 1) * mel(8000) / (mel(8000) - mel(20)) + math.log2(n_fft)
    tolerance = ulps * eps * condition * reference.exp().sum(1, keepdim=True)  # (frames, 1)
    assert ((ours.exp() - reference.exp()).abs() <= tolerance).all()
    well_conditioned = reference.exp() >= 100 * tolerance
    assert well_conditioned.float().mean() > 0.03  # the strong check covers real bins, not none
    assert ((ours - reference).abs()[well_conditioned] <= 1e-2).all()


def test_item_text_encoder_embeds_training_text_only():
    records = [{"id": i, "modality": m, "texts": [{"text": t, "kind": "caption"} for t in texts]
                + [{"text": "held out words", "kind": "query", "set": "A"}]}
               for i, (m, texts) in enumerate([("image", ["cat", "kitten", "cat kitten"]),
                                               ("audio", ["a meowing kitten"]), ("video", ["stock market"])])]
    encoder = encoders.ItemText(CPU)
    x = encoder.encode(records)
    assert x.shape == (3, encoders.ItemText.dim) and unit_rows(x)
    assert (x[0] @ x[1]) > (x[0] @ x[2]) + 0.2  # kittens are closer to kittens than to stocks
    again = encoder.encode([{**records[0], "texts": records[0]["texts"][:3]}])  # the held-out query changes nothing
    assert torch.allclose(again[0], x[0], atol=1e-6)
    with pytest.raises(ValueError, match="item 'x' has no training text"):
        encoder.encode([{"id": "x", "modality": "image", "texts": [{"text": "q", "kind": "query", "set": "A"}]}])
