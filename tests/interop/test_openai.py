"""improved-diffusion / guided-diffusion checkpoints: their flags -> our configs, their key layout <-> ours, and
`pakhsh sample -m model.pt --openai-flags ...`. The checkpoints are written in THEIR layout (names and the fused
per-head qkv order of their QKVAttention), from a randomly initialised net of ours through the inverse mapping."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pakhsh.cli import main
from pakhsh.diffusion import ModelOutput, VarianceType
from pakhsh.interop.openai import (
    OpenAICheckpointError,
    OpenAIFlagsError,
    from_openai_state_dict,
    load_openai_checkpoint,
    openai_configs,
    parse_openai_flags,
    to_openai_state_dict,
)
from pakhsh.nets.unet import UNet

# improved-diffusion's CIFAR-10 flags, narrowed to run in a test: 32 px, channel_mult (1, 2, 2, 2) by image size
FLAGS = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --attention_resolutions 16,8 --learn_sigma True "
         "--class_cond True --diffusion_steps 40 --noise_schedule cosine --dropout 0.0 --num_heads 2")

# Names improved-diffusion's UNetModel gives these tensors (unet.py: input_blocks / middle_block / output_blocks / out)
EXPECTED_KEYS = [
    "time_embed.0.weight", "time_embed.2.bias", "label_emb.weight",
    "input_blocks.0.0.weight",  # conv_nd(in_channels, model_channels)
    "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.in_layers.2.weight",
    "input_blocks.1.0.emb_layers.1.weight",
    "input_blocks.1.0.out_layers.0.bias", "input_blocks.1.0.out_layers.3.weight",
    "input_blocks.2.0.op.weight",  # Downsample(conv_resample=True)
    "input_blocks.3.0.skip_connection.weight", "input_blocks.3.1.norm.weight", "input_blocks.3.1.qkv.weight",
    "input_blocks.3.1.proj_out.bias",  # 16 px level: ResBlock (32 -> 64 channels) + AttentionBlock
    "middle_block.0.in_layers.2.weight", "middle_block.1.qkv.weight", "middle_block.2.out_layers.3.bias",
    "output_blocks.0.0.skip_connection.weight", "output_blocks.1.1.conv.weight",  # Upsample after the last ResBlock
    "output_blocks.4.1.qkv.bias",  # attention of the decoder's 8 px level
    "out.0.weight", "out.2.weight", "out.2.bias",
]  # fmt: skip


def random_net(flags: str = FLAGS, seed: int = 0) -> UNet:
    cfg = openai_configs(flags)
    cfg.unet.num_classes = cfg.unet.num_classes and 10  # 10 classes instead of ImageNet's 1000
    net = UNet(cfg.unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


def their_checkpoint(tmp_path: Path, flags: str = FLAGS, **kw) -> tuple[UNet, Path]:
    net = random_net(flags)
    path = tmp_path / "model.pt"
    torch.save(to_openai_state_dict(net, **kw), path)
    return net, path


def test_flags_become_our_configs() -> None:
    cfg = openai_configs(FLAGS)
    u, d = cfg.unet, cfg.diffusion
    assert (u.image_size, u.model_channels, u.channel_mult, u.num_res_blocks) == (32, 32, (1, 2, 2, 2), 1)
    assert u.attention_resolutions == (16, 8) and u.learn_sigma and u.num_classes == 1000 and u.num_groups == 32
    assert (d.num_steps, d.schedule, d.variance, d.model_output) == (40, "cosine", VarianceType.LEARNED_RANGE,
                                                                      ModelOutput.EPS)
    assert cfg.rescale_timesteps  # improved-diffusion's default
    flags = parse_openai_flags("--sigma_small True --predict_xstart true --use_ddim True --batch_size 4")
    assert openai_configs(flags).diffusion.variance == VarianceType.FIXED_SMALL  # sampling flags are ignored
    assert openai_configs(flags).diffusion.model_output == ModelOutput.X0
    assert openai_configs("--learn_sigma False").diffusion.variance == VarianceType.FIXED_LARGE


@pytest.mark.parametrize("flags, named", [
    ("--image_size 32 --not_a_flag 3", "--not_a_flag"), ("--learn_sigma maybe", "--learn_sigma"),
    ("--num_heads 4 --num_heads_upsample 2", "--num_heads_upsample"), ("--image_size 48", "--image_size 48"),
    ("--image_size 64 --channel_mult 0.5,1,2", "--channel_mult"), ("--noise_schedule sqrt", "--noise_schedule"),
    ("--num_channels", "--num_channels"),
])  # fmt: skip
def test_bad_flags_are_named(flags: str, named: str) -> None:
    with pytest.raises(OpenAIFlagsError, match=named):
        openai_configs(flags)


def test_state_dict_uses_their_key_names() -> None:
    state = to_openai_state_dict(random_net())
    missing = [k for k in EXPECTED_KEYS if k not in state]
    assert not missing
    assert state["middle_block.1.qkv.weight"].shape == (3 * 64, 64, 1)  # conv_nd(1, C, 3C, 1)
    assert state["label_emb.weight"].shape == (10, 128)  # no null-class row in their layout
    assert not any(k.startswith(("down.", "up.", "middle.", "conv_in")) for k in state)


def their_attention(state: dict, prefix: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    """improved-diffusion's AttentionBlock + QKVAttention forward, written from their unet.py, on their tensors."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, -1)
    normed = F.group_norm(flat, 32, state[f"{prefix}.norm.weight"], state[f"{prefix}.norm.bias"])
    qkv = F.conv1d(normed, state[f"{prefix}.qkv.weight"], state[f"{prefix}.qkv.bias"])
    qkv = qkv.reshape(b * heads, -1, qkv.shape[2])  # per head: [q_h | k_h | v_h] (their legacy order)
    ch = qkv.shape[1] // 3
    q, k, v = torch.split(qkv, ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    out = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, qkv.shape[-1])
    out = F.conv1d(out, state[f"{prefix}.proj_out.weight"], state[f"{prefix}.proj_out.bias"])
    return (flat + out).reshape(b, c, h, w)


def test_attention_layout_is_their_qkv_order() -> None:
    """Renaming alone would pass a key check; their attention maths on the converted tensors must agree too."""
    net = random_net()
    state = to_openai_state_dict(net)
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        ours = net.middle[1](x)
    torch.testing.assert_close(their_attention(state, "middle_block.1", x, heads=2), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra", ["", " --use_new_attention_order True --resblock_updown True --num_head_channels 16"])
def test_round_trip_through_their_layout(tmp_path: Path, extra: str) -> None:
    flags = FLAGS + extra
    net, path = their_checkpoint(tmp_path, flags, new_attention_order=bool(extra))
    model, cfg = load_openai_checkpoint(path, flags)
    assert model.net.cfg.num_classes == 10  # read from label_emb
    back = model.net.state_dict()
    for k, v in net.state_dict().items():
        if k != "label_emb.weight":
            torch.testing.assert_close(back[k], v, rtol=0, atol=0)
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 39]), torch.tensor([1, 9])
    with torch.no_grad():  # rescale_timesteps: their network saw t * 1000 / T
        torch.testing.assert_close(model(x, t, y), net(x, t.float() * 25.0, y), rtol=1e-5, atol=1e-5)


def test_checkpoint_that_does_not_fit_the_flags_is_named(tmp_path: Path) -> None:
    _, path = their_checkpoint(tmp_path)
    with pytest.raises(OpenAICheckpointError, match="model.pt.*attention_resolutions"):
        load_openai_checkpoint(path, FLAGS.replace("16,8", "16"))
    with pytest.raises(OpenAICheckpointError, match="num_channels"):
        state = torch.load(path, weights_only=True)
        from_openai_state_dict(state, UNet(openai_configs(FLAGS.replace("num_channels 32", "num_channels 64")).unet))


class Payload:
    """Any pickled object: torch.load(weights_only=True) must refuse to build it."""


def test_pickled_objects_are_refused(tmp_path: Path, capsys) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, path)
    assert main(["info", str(path), "--openai-flags", FLAGS]) == 2
    err = capsys.readouterr().err
    assert "evil.pt" in err and "will not execute" in err and "Traceback" not in err


def test_cli_samples_an_openai_checkpoint(tmp_path: Path, capsys) -> None:
    _, path = their_checkpoint(tmp_path)
    out = tmp_path / "s.png"
    assert main(["sample", "-m", str(path), "--openai-flags", FLAGS, "-n", "2", "--steps", "2", "--label", "3",
                 "-o", str(out), "-q"]) == 0
    assert out.is_file()
    flags_file = tmp_path / "flags.json"  # or a JSON object of the same flags
    words = FLAGS.split()
    flags_file.write_text(json.dumps({words[i].lstrip("-"): words[i + 1] for i in range(0, len(words), 2)}))
    assert main(["info", str(path), "--openai-flags", str(flags_file)]) == 0
    info = capsys.readouterr().out
    assert "format:     openai" in info and "T=40 cosine" in info and "no null class" in info
    assert main(["sample", "-m", str(path), "-q"]) == 2  # no flags: say which option is missing
    assert "--openai-flags" in capsys.readouterr().err
