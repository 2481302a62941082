"""A tiny causal LM with the trainer's model protocol, for tests that must not wait on the real model.

forward(input_ids, labels=None, cu_seqlens=None) -> .loss (HF-style shifted mean CE), .logits;
save_pretrained / from_pretrained (config.json + model.safetensors). The mixing is a causal
2-token window plus a learned position-free bias, enough to make loss fall on a fixed batch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


@dataclass
class Output:  # a dataclass, like the real model's: DDP finds the output tensors in it
    loss: torch.Tensor | None
    logits: torch.Tensor


class StandInLM(torch.nn.Module):
    def __init__(self, vocab_size: int = 320, hidden: int = 32):
        super().__init__()
        self.config = {"vocab_size": vocab_size, "hidden": hidden}
        self.embed = torch.nn.Embedding(vocab_size, hidden)
        self.mix = torch.nn.Linear(2 * hidden, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.head = torch.nn.Linear(hidden, vocab_size, bias=False)

    def forward(self, input_ids, labels=None, cu_seqlens=None):
        h = self.embed(input_ids)
        prev = F.pad(h, (0, 0, 1, 0))[:, :-1]
        if cu_seqlens is not None:  # no mixing across packed documents
            starts = cu_seqlens[:-1].long()
            mask = torch.ones(h.shape[1], 1, device=h.device)
            mask[starts] = 0
            prev = prev * mask
        logits = self.head(self.norm(torch.tanh(self.mix(torch.cat([h, prev], -1)))))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return Output(loss=loss, logits=logits)

    def save_pretrained(self, directory):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.config, f)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, os.path.join(directory, "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory):
        with open(os.path.join(directory, "config.json")) as f:
            cfg = json.load(f)
        m = cls(**cfg)
        m.load_state_dict(load_file(os.path.join(directory, "model.safetensors")))
        return m


def stand_in_factory(cfg, tokenizer):
    return StandInLM(vocab_size=((tokenizer.vocab_size + 63) // 64) * 64)
