"""The LightningModule: a backbone, an optional SG head or baseline method, loss and metrics.

One module covers every method in the comparison, so they share data, loss and metrics:
``plain`` (the backbone alone; with the ``gpt`` backbone it is the attention reference),
``jrt`` (prompt read twice), ``soft_prompt`` (learned prefix, backbone frozen), and ProSG
(``sg_head`` set; ``mode: oracle`` for the true-gradient test-time-training oracle).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from prosg.backbones.base import Backbone
from prosg.backbones.registry import from_pretrained
from prosg.baselines import SoftPrompt, repeat_prompt
from prosg.errors import ConfigError, ProSGError
from prosg.generate import generate
from prosg.metrics import ForgettingMetrics
from prosg.sg.head import Session, SGHead

METHODS = ("plain", "jrt", "soft_prompt")


class ProSGModule(L.LightningModule):
    """Backbone (+ SG head | JRT | soft prompt) trained on response tokens, scored by forgetting metrics.

    ``backbone`` is a factory called with the data's vocabulary size (what a ``class_path``
    config without ``vocab_size`` becomes) or an already-built ``Backbone``; ``pretrained`` is
    a local checkpoint path instead. ``vocab_size`` is linked from the DataModule by the CLI.
    """

    def __init__(
        self,
        backbone: Callable[[int], Backbone] | None = None,
        pretrained: str | None = None,
        sg_head: SGHead | None = None,
        method: str = "plain",
        freeze_backbone: bool | None = None,
        soft_prompt_tokens: int = 16,
        lr: float = 1e-3,
        lr_backbone: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        schedule: str = "cosine",
        min_lr_ratio: float = 0.1,
        grad_clip_eta: float | None = None,
        generation_eval: bool = True,
        prompt_state_dropout: float = 0.0,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        # Under the CLI these are the class_path configs, so load_from_checkpoint can rebuild the model.
        self.save_hyperparameters()
        if (backbone is None) == (pretrained is None):
            raise ConfigError("give exactly one of model.backbone (a class_path config) or model.pretrained (a checkpoint path)")
        if method not in METHODS:
            raise ConfigError(f"model.method={method!r}; choose one of {', '.join(METHODS)}")
        if sg_head is not None and method != "plain":
            raise ConfigError(f"an SG head runs on the plain backbone; set model.method: plain (got {method!r}) or sg_head: null")
        if not 0.0 <= prompt_state_dropout < 1.0:
            raise ConfigError(f"model.prompt_state_dropout={prompt_state_dropout} must be in [0, 1)")
        if prompt_state_dropout > 0 and sg_head is None:
            raise ConfigError("model.prompt_state_dropout only applies with an SG head (it forces the delta to carry the prompt); set it to 0 or add model.sg_head")
        if schedule not in ("cosine", "constant"):
            raise ConfigError(f"model.schedule={schedule!r}; choose 'cosine' or 'constant'")
        if isinstance(backbone, Backbone):
            self.backbone = backbone
        elif backbone is not None:  # a factory (class_path config) that still needs the vocabulary size
            if vocab_size is None:
                raise ConfigError("model.vocab_size is unset: use a ProSG DataModule (it is linked) or set it explicitly")
            self.backbone = backbone(vocab_size)
        else:
            self.backbone = from_pretrained(pretrained)
        if vocab_size is not None and vocab_size > self.backbone.vocab_size:
            raise ConfigError(
                f"the data has {vocab_size} token ids but the backbone's vocabulary is {self.backbone.vocab_size}; "
                "build the backbone with a larger vocab_size or use its own tokenizer"
            )
        self.sg_head = sg_head
        if sg_head is not None:
            sg_head.attach(self.backbone)
        self.soft_prompt = None
        if method == "soft_prompt":
            with torch.no_grad():
                vocab = self.backbone.embed(torch.arange(self.backbone.vocab_size, device=self.backbone_device()))
            self.soft_prompt = SoftPrompt(soft_prompt_tokens, self.backbone.d_model, init_from=vocab)
        if freeze_backbone is None:  # the paper's setting: a head (or prefix) on a frozen model
            freeze_backbone = sg_head is not None or method == "soft_prompt"
        if method == "soft_prompt" and not freeze_backbone:
            raise ConfigError("soft prompt tuning trains only the prefix; leave model.freeze_backbone unset or true")
        self.backbone.requires_grad_(not freeze_backbone)
        self.metrics: ForgettingMetrics | None = None
        self._gen_updated = False
        self.pad_id = 0

    def backbone_device(self) -> torch.device:
        """Device of the backbone's parameters."""
        return next(self.backbone.parameters()).device

    # -- forward ---------------------------------------------------------------------------
    def _prepare(self, batch: dict) -> dict:
        return repeat_prompt(batch, self.pad_id) if self.hparams.method == "jrt" else batch

    def forward(self, batch: dict) -> Tensor:
        """Teacher-forced logits (B, T, V) aligned with ``batch['input_ids']`` (after the method's transform)."""
        ids, plen = batch["input_ids"], batch["prompt_len"]
        self.backbone.check_ids(ids, ndim=2)
        embeds = self.backbone.embed(ids)
        if self.soft_prompt is not None:
            embeds = self.soft_prompt.prepend(embeds)
            return self.backbone.forward_embeds(embeds).logits[:, self.soft_prompt.n_tokens :]
        if self.sg_head is None:
            return self.backbone.forward_embeds(embeds).logits
        oracle = self.sg_head.prompt_gradients(ids, plen) if self._needs_true_grads() else None
        with self.sg_head.session(plen, oracle if self.sg_head.mode == "oracle" else None) as s:
            logits = self.backbone.forward_embeds(embeds).logits
            p = self.hparams.prompt_state_dropout
            if self.training and p > 0:
                drop = torch.rand(ids.shape[0], device=ids.device) < p
                if drop.any():
                    logits = self._response_without_state(ids, plen, logits, drop, s)
        self._last_aux = self.sg_head.aux_loss(s, oracle) if (oracle is not None and self.sg_head.mode == "synthetic") else None
        return logits

    def _response_without_state(self, ids: Tensor, plen: Tensor, logits: Tensor, drop: Tensor, s: Session) -> Tensor:
        """Re-run the responses of samples ``drop`` from an empty state with only the delta holding the prompt.

        Prompt-state dropout: a jointly trained backbone can keep the prompt in its state within the
        training distances and ignore the delta, which then does not help beyond them. Cutting the
        state for some samples makes the delta carry the prompt; the other samples keep both paths.
        """
        rows = drop.nonzero().squeeze(1)  # (n,)
        T = ids.shape[1]
        R = int(T - plen[rows].min())
        idx = plen[rows, None] + torch.arange(R, device=ids.device)  # (n, R) response positions
        valid = idx < T
        resp = torch.where(valid, ids[rows].gather(1, idx.clamp(max=T - 1)), self.pad_id)
        s.start_steps()
        s.select(rows)
        resp_logits = self.backbone.forward_embeds(self.backbone.embed(resp)).logits  # (n, R, V)
        out = logits.clone()
        out[rows[:, None].expand_as(idx)[valid], idx[valid]] = resp_logits[valid].to(out.dtype)
        return out

    def _needs_true_grads(self) -> bool:
        head = self.sg_head
        return head is not None and (head.mode == "oracle" or (head.aux_weight > 0 and self.training))

    def loss(self, batch: dict, logits: Tensor) -> Tensor:
        """Weighted next-token cross-entropy over the response (logits at t-1 predict token t)."""
        w = batch["loss_weight"][:, 1:].to(logits.dtype)
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
        return (nll * w).sum() / w.sum().clamp(min=1e-8)

    # -- steps -----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        batch = self._prepare(batch)
        self._last_aux = None
        logits = self(batch)
        loss = self.loss(batch, logits)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["task"]))
        if self._last_aux is not None:
            self.log("train/aux", self._last_aux, batch_size=len(batch["task"]))
            loss = loss + self.sg_head.aux_weight * self._last_aux
        if not torch.isfinite(loss):
            raise ProSGError(
                f"loss became {loss.item()} at global step {self.global_step} (batch {batch_idx}). Likely causes: "
                "a learning rate too high for this model (lower model.lr / model.lr_backbone), an SG step size η "
                "that diverged (set model.grad_clip_eta), or fp16 overflow (use bf16 or 32-true precision)."
            )
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.sg_head is not None and self.hparams.grad_clip_eta is not None:
            with torch.no_grad():
                self.sg_head.eta.clamp_(-self.hparams.grad_clip_eta, self.hparams.grad_clip_eta)

    def _eval_step(self, batch: dict, prefix: str) -> None:
        if self.metrics is None:
            raise ConfigError("evaluation needs a ProSG DataModule (it declares the slices and distance buckets)")
        batch = self._prepare(batch)
        logits = self(batch)
        self.log(f"{prefix}/loss", self.loss(batch, logits), batch_size=len(batch["task"]), sync_dist=True)
        self.metrics.update(batch, logits)
        if self.hparams.generation_eval:
            self._generation_update(batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        """Teacher-forced next-token predictions: ``pred[:, t]`` is the model's guess for token t."""
        batch = self._prepare(batch)
        logits = self(batch)
        pred = torch.cat([torch.full_like(batch["input_ids"][:, :1], -1), logits[:, :-1].argmax(-1)], dim=1)
        return {"index": batch["index"], "pred": pred, "correct": pred == batch["input_ids"],
                "answer_kind": batch["answer_kind"], "distance": batch["distance"]}

    def _generation_update(self, batch: dict) -> None:
        """Free-running accuracy for tasks whose whole response follows from the prompt (copy, instruction)."""
        rows = [i for i, t in enumerate(batch["task"]) if t in ("copy", "instruction")]
        if not rows:
            return
        for plen in sorted({int(batch["prompt_len"][i]) for i in rows}):
            group = [i for i in rows if int(batch["prompt_len"][i]) == plen]
            ids = batch["input_ids"][group]
            n_new = int(batch["attention_mask"][group].sum(1).max()) - plen
            new = generate(self.backbone, ids[:, :plen], n_new, sg_head=self.sg_head, soft_prompt=self.soft_prompt)
            # score generated tokens like teacher-forced ones: the "logits" are one-hot picks
            picks = torch.cat([ids[:, :plen], new], dim=1)
            onehot = F.one_hot(picks, self.backbone.vocab_size).to(torch.float32)
            sub = {k: (v[group] if isinstance(v, Tensor) else [v[i] for i in group]) for k, v in batch.items()}
            sub = {k: (v[:, : picks.shape[1]] if isinstance(v, Tensor) and v.dim() == 2 else v) for k, v in sub.items()}
            self.gen_metrics.update(sub, torch.cat([onehot[:, 1:], onehot[:, -1:]], dim=1))
            self._gen_updated = True

    def _log_metrics(self, prefix: str) -> None:
        # compute() already all-reduced the states; sync_dist only tells Lightning so (no second reduction
        # of equal values changes them)
        self.log_dict({f"{prefix}/{k}": v for k, v in self.metrics.compute().items()}, sync_dist=True)
        self.metrics.reset()
        if self._gen_updated:  # free-running scores; perplexity of one-hot picks means nothing
            gen = {f"{prefix}/gen/{k}": v for k, v in self.gen_metrics.compute().items() if k != "ppl"}
            self.log_dict(gen, sync_dist=True)
            self.gen_metrics.reset()
            self._gen_updated = False

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse, with the fix, a checkpoint whose method parts do not match this config."""
        keys = checkpoint.get("state_dict", {}).keys()
        for part, present in (("sg_head", self.sg_head is not None), ("soft_prompt", self.soft_prompt is not None)):
            saved = any(k.startswith(part + ".") for k in keys)
            if saved != present:
                raise ConfigError(
                    f"the checkpoint was trained {'with' if saved else 'without'} a {part} but this config has "
                    f"{'none' if saved else 'one'}; run with the config saved beside the checkpoint "
                    f"(config.yaml in the run directory) or set model.{part if part == 'sg_head' else 'method'} to match."
                )

    # -- setup -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "bucket_edges"):
            return
        self.pad_id = int(dm.pad_id)
        self.metrics = ForgettingMetrics(dm.bucket_edges, dm.tasks, dm.n_facts_values).to(self.device)
        self.gen_metrics = ForgettingMetrics(dm.bucket_edges, dm.tasks, dm.n_facts_values).to(self.device)

    def configure_optimizers(self) -> Any:
        head_params = [p for m in (self.sg_head, self.soft_prompt) if m is not None for p in m.parameters() if p.requires_grad]
        backbone_params = [p for p in self.backbone.parameters() if p.requires_grad]
        lr = self.hparams.lr
        groups = []
        if head_params:
            groups.append({"params": head_params, "lr": lr, "name": "head"})
        if backbone_params:
            groups.append({"params": backbone_params, "lr": self.hparams.lr_backbone or lr, "name": "backbone"})
        if not groups:
            raise ConfigError("nothing to train: the backbone is frozen and there is no SG head or soft prompt")
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(self.hparams.betas), weight_decay=self.hparams.weight_decay)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        warm, floor, cosine = self.hparams.warmup_steps, self.hparams.min_lr_ratio, self.hparams.schedule == "cosine"

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if not cosine or not math.isfinite(total) or total <= warm:
                return 1.0
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
