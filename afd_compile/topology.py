"""`afd_size` (xAyF): how many attention and FFN ranks, their global ranks, and the M:N
mapping of attention ranks onto FFN ranks."""

from __future__ import annotations

import re
from dataclasses import dataclass

from afd_compile.errors import AfdError

ROLES = ("attention", "ffn")
_ROLE_ALIASES = {"attention": "attention", "attn": "attention", "ffn": "ffn"}
_AFD_SIZE = re.compile(r"(\d+)A(\d+)F", re.IGNORECASE)


def parse_role(name: str) -> str:
    role = _ROLE_ALIASES.get(str(name).strip().lower())
    if role is None:
        raise AfdError(f"unknown role {name!r}: expected 'attention' (or 'attn') or 'ffn'")
    return role


@dataclass(frozen=True)
class Topology:
    num_attention: int
    num_ffn: int

    @classmethod
    def parse(cls, afd_size: str) -> "Topology":
        m = _AFD_SIZE.fullmatch(str(afd_size).strip())
        if m is None:
            raise AfdError(f"malformed afd_size {afd_size!r}: expected xAyF, e.g. 1A1F or 2A2F")
        a, f = int(m[1]), int(m[2])
        if a < 1 or f < 1:
            raise AfdError(f"afd_size {afd_size!r} needs at least one attention and one FFN rank")
        return cls(a, f)

    def __str__(self) -> str:
        return f"{self.num_attention}A{self.num_ffn}F"

    @property
    def world_size(self) -> int:
        return self.num_attention + self.num_ffn

    def num_ranks(self, role: str) -> int:
        return self.num_attention if role == "attention" else self.num_ffn

    def global_rank(self, role: str, rank: int) -> int:
        """Attention ranks come first (global rank 0 hosts the rendezvous store), then FFN ranks."""
        if not 0 <= rank < self.num_ranks(role):
            raise AfdError(f"{role} rank {rank} does not exist in afd_size {self}: "
                           f"valid ranks are 0..{self.num_ranks(role) - 1}")
        return rank if role == "attention" else self.num_attention + rank

    def ffn_of(self, attention_rank: int) -> int:
        """The FFN rank an attention rank sends to: contiguous blocks, balanced for any A and F."""
        return attention_rank * self.num_ffn // self.num_attention

    def attention_peers(self, ffn_rank: int) -> list[int]:
        return [a for a in range(self.num_attention) if self.ffn_of(a) == ffn_rank]

    def check_experts(self, n_routed_experts: int) -> None:
        if n_routed_experts % self.num_ffn:
            raise AfdError(f"afd_size {self}: n_routed_experts={n_routed_experts} is not divisible by "
                           f"{self.num_ffn} FFN ranks")

    def describe(self) -> str:
        return ", ".join(f"attention {a} -> ffn {self.ffn_of(a)}" for a in range(self.num_attention))
