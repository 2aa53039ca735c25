"""SAE architectures, one module per paper; importing this package registers them all.

| name        | class          | paper                                                   |
|-------------|----------------|---------------------------------------------------------|
| "relu"      | `ReLUSAE`      | Cunningham et al. 2023; Bricken et al. 2023 (+ April-2024 penalty) |
| "topk"      | `TopKSAE`      | Gao et al. 2024 (TopK + AuxK)                           |
| "batchtopk" | `BatchTopKSAE` | Bussmann et al. 2024                                    |
| "jumprelu"  | `JumpReLUSAE`  | Rajamanoharan et al. 2024b                              |
| "gated"     | `GatedSAE`     | Rajamanoharan et al. 2024a                              |

Build one by name with `sae.dictionary.build("topk", d_in=..., n_latents=..., k=...)`.
"""
from __future__ import annotations

from .gated import GatedSAE
from .jumprelu import JumpReLUSAE
from .relu import ReLUSAE
from .topk import BatchTopKSAE, TopKSAE

__all__ = ["ReLUSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "GatedSAE"]
