"""How a step is computed: activation checkpointing, torch.compile, bf16, frozen towers without
autograd, sharding units, packed training through the DataModule, and trainable-only
checkpoints that resume exactly."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import image_text_batch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_streaming import make_dm, write_set

from lmm.model.efficiency import EfficiencyConfig, checkpoint_blocks, is_block
from lmm.model.freeze import FreezeConfig
from lmm.model.language import LanguageConfig, decoder_blocks
from lmm.model.towers import VisionConfig
from lmm.train.module import LMMModule


def _loss_and_grads(model, batch) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = model(*batch)
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def _assert_same(a, b, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=1e-5)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=atol, rtol=1e-4, msg=name)


def test_blocks_are_marked_for_sharding_and_checkpointing(lmm_model):
    from lmm.train.parallel import BlockFSDPStrategy

    marked = [m for m in lmm_model.modules() if is_block(m)]
    want = [*lmm_model.vision.blocks(), *decoder_blocks(lmm_model.llm)]
    assert len(marked) == len(want) == 4 and all(any(m is w for w in want) for m in marked)
    # A parsed config passes auto_wrap_policy=None; the strategy still wraps exactly the blocks.
    strategy = BlockFSDPStrategy(activation_checkpointing=True, auto_wrap_policy=None)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert all(policy(module=m, recurse=False, nonwrapped_numel=0) for m in want)
    assert not policy(module=lmm_model.connector, recurse=False, nonwrapped_numel=0)
    assert strategy.kwargs["use_orig_params"] is True


def test_activation_checkpointing_gives_the_same_loss_and_gradients(fresh_lmm):
    model = fresh_lmm.train()
    batch = image_text_batch(model)
    ref = _loss_and_grads(model, batch)
    assert (
        checkpoint_blocks(model.vision.blocks()) == 2
        and checkpoint_blocks(decoder_blocks(model.llm)) == 2
    )
    assert checkpoint_blocks(model.vision.blocks()) == 0  # idempotent
    _assert_same(_loss_and_grads(model, batch), ref)
    with torch.no_grad():  # generation path: plain forward
        torch.testing.assert_close(model(*batch), ref[0])


def test_compiled_blocks_give_the_same_loss_and_gradients(tiny_models):
    torch.manual_seed(0)
    kw = dict(
        vision=VisionConfig(name_or_path=str(tiny_models["vision"]), feature_layer=-1),
        llm=LanguageConfig(name_or_path=str(tiny_models["llm"])),
    )
    eager = LMMModule(**kw)
    compiled = LMMModule(
        **kw,
        efficiency=EfficiencyConfig(
            compile=True, compile_backend="aot_eager", grad_checkpointing_llm=True
        ),
    )
    compiled.model.load_state_dict(eager.model.state_dict())
    compiled.configure_model()
    compiled.configure_model()  # Lightning may call it again (fit then test): nothing is wrapped twice
    batch = image_text_batch(eager.model)
    _assert_same(
        _loss_and_grads(compiled.model, batch), _loss_and_grads(eager.model, batch), atol=1e-5
    )
    assert set(compiled.model.state_dict()) == set(eager.model.state_dict())  # names unchanged


def test_frozen_tower_runs_without_autograd(fresh_lmm):
    from lmm.model.freeze import FreezeConfig as FC

    model = fresh_lmm.train()
    seen = []
    model.vision.register_forward_hook(lambda m, i, out: seen.append(out.requires_grad))
    batch = image_text_batch(model)
    model.apply_freeze(FC(vision="frozen"))
    model(*batch).backward()
    model.apply_freeze(FC(vision="full"))
    model(*batch).backward()
    assert seen == [False, True]


def _fit_module(
    tiny_models,
    pattern,
    max_steps,
    precision="32-true",
    ckpt_path=None,
    checkpoints=None,
    data=None,
    **kw,
):
    torch.manual_seed(0)
    module = LMMModule(
        vision=VisionConfig(name_or_path=str(tiny_models["vision"]), feature_layer=-1),
        llm=LanguageConfig(name_or_path=str(tiny_models["llm"])),
        **kw,
    )
    dm = make_dm(pattern, module.processor, **(data or {}))
    losses = []

    class Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        precision=precision,
        logger=False,
        callbacks=[Losses()] + ([checkpoints] if checkpoints else []),
        enable_checkpointing=checkpoints is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, losses


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_set(tmp_path_factory.mktemp("eff"), "e", [12, 12], text_only_every=5)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_training_runs_on_cpu(tiny_models, shards, precision):
    module, losses = _fit_module(tiny_models, shards, 3, precision=precision)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    dtype = next(module.model.llm.parameters()).dtype
    assert dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)


def test_packed_training_equals_padded_training(tiny_models, shards):
    """The same batches, packed or padded: the same losses and (up to float order) weights."""
    padded, a = _fit_module(tiny_models, shards, 3)
    packed, b = _fit_module(tiny_models, shards, 3, data={"pack_length": 512})
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(padded.model.named_parameters(), packed.model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)


def test_stage1_checkpoints_hold_only_trainable_weights_and_resume_exactly(
    tiny_models, shards, tmp_path
):
    stage1 = dict(freeze=FreezeConfig(vision="frozen", llm="frozen"))
    ckpts = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=3, save_top_k=-1
    )
    straight, _ = _fit_module(tiny_models, shards, 6, checkpoints=ckpts, **stage1)
    path = tmp_path / "ckpt" / "step=3.ckpt"
    saved = torch.load(path, weights_only=True)
    assert saved["lmm_trainable_only"] and set(saved["state_dict"]) == {
        f"model.{n}" for n, p in straight.model.named_parameters() if p.requires_grad
    }
    assert all(k.startswith("model.connector.") for k in saved["state_dict"])
    assert (
        saved["optimizer_states"]
        and saved["lr_schedulers"]
        and saved["LMMDataModule"]["batches"] == 3
    )

    resumed, _ = _fit_module(tiny_models, shards, 6, ckpt_path=path, **stage1)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    # A full checkpoint is larger; resuming a trainable-only one under another policy is refused.
    full = ModelCheckpoint(dirpath=tmp_path / "full", filename="{step}", every_n_train_steps=3)
    _fit_module(tiny_models, shards, 3, checkpoints=full, checkpoint_trainable_only=False, **stage1)
    assert not torch.load(tmp_path / "full" / "step=3.ckpt", weights_only=True).get(
        "lmm_trainable_only"
    )
    assert (tmp_path / "full" / "step=3.ckpt").stat().st_size > 3 * path.stat().st_size
    with pytest.raises(ValueError, match="lacks .* weight"):
        _fit_module(
            tiny_models,
            shards,
            6,
            ckpt_path=path,
            freeze=FreezeConfig(vision="frozen"),
            checkpoint_trainable_only=True,
        )
