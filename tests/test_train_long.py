"""`python -m moga.train demo --world long`: continue a short-world demo file on long stories (tiny, CPU)."""
import json

import torch

from moga.demo.long_data import LongWorldData
from moga.demo.long_world import LONG_VOCAB, LongStory
from moga.demo.text import UNK, DemoTextEncoder, extend_vocab

torch.set_num_threads(1)


def test_extend_vocab_keeps_the_old_encoder_output():
    torch.manual_seed(0)
    old = DemoTextEncoder(dim=16, layers=1, heads=2)
    new = extend_vocab(old, LONG_VOCAB)
    assert new.vocab == LONG_VOCAB and new.embed.weight.shape[0] == len(old.vocab) + 2
    assert torch.equal(new.embed.weight[:len(old.vocab)], old.embed.weight)
    assert torch.equal(new.embed.weight[-1], old.embed.weight[UNK])
    cap = "the red one moves left on a grey background"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old encoder reads 'the', 'one' as <unk>, and says so
        a = old.encode([cap])[0]
    torch.testing.assert_close(new.encode([cap])[0], a)  # a new word starts as what <unk> was
    try:
        extend_vocab(old, ("x",) + LONG_VOCAB)
    except ValueError as exc:
        assert "must begin" in str(exc)
    else:
        raise AssertionError("a vocabulary that moves old ids must be refused")


def test_long_batches_mix_short_ones_and_keep_the_token_count(patch_codec):
    data = LongWorldData(patch_codec, seed=1, long_shot_frames=5, short_every=3, long_shot_cycle=(12,))
    long0, short2 = data.stories(0, 8), data.stories(2, 8)
    assert isinstance(long0[0], LongStory) and len(long0[0].shots) == 12
    assert not isinstance(short2[0], LongStory) and len(short2) == 8
    # 8 short 4-shot stories = 8 x 1,280 tokens; a 12-shot story of 5-frame (2 latent frames) shots has 1,536
    assert len(long0) == 8 * 1280 // 1536
    assert data.stories(0, 8) == long0  # index -> the same stories (resumable)
    b = data.batch(0, 8, "cpu")
    assert b.latent.shape[0] == len(long0) and b.shot_frames == (2,) * 12
    assert b.captions[1][0] == long0[0].captions[1]


def test_train_demo_long_from_a_short_file_resumes(tmp_path):
    from moga.demo.model import demo_info, load_demo
    from moga.train.__main__ import main

    short = tmp_path / "short"
    assert main(["demo", "--out", str(short), "--tiny", "--steps", "1", "--batch", "1", "--device", "cpu",
                 "--warmup", "2"]) == 0
    out = tmp_path / "long"
    flags = ["demo", "--out", str(out), "--tiny", "--batch", "2", "--device", "cpu", "--warmup", "2",
             "--world", "long", "--long-shot-frames", "5", "--init", str(short / "model.safetensors"),
             "--codec", str(short / "codec.safetensors"), "--log-every", "1"]
    assert main([*flags, "--steps", "2"]) == 0
    assert main([*flags, "--steps", "4", "--resume"]) == 0
    assert json.loads((out / "ckpt" / "state.json").read_text())["step"] == 4
    model = load_demo(out / "model.safetensors")
    assert model.text_encoder.vocab == LONG_VOCAB
    training = demo_info(model)["training"]
    assert training["world"] == "long" and training["init"] == "model.safetensors" and training["steps"] == 4
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "train" for r in rows)
    # the new words' rows started as the file's <unk> row and then trained
    src = load_demo(short / "model.safetensors").text_encoder.embed.weight
    assert not torch.equal(model.text_encoder.embed.weight[-2:], src[UNK].expand(2, -1))
