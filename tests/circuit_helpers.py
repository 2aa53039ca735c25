"""Small builders shared by the attribution and edge tests (tiny float64 models, TopK dictionaries,
clean/counterfactual token pairs)."""
import torch

from sae.architectures import TopKSAE

def topk_dicts(sites, n_latents=24, k=6, seed=0):
    torch.manual_seed(seed)
    dicts = {}
    for s in sites:
        d = TopKSAE(32, n_latents, k=k)
        with torch.no_grad():
            d.b_enc.normal_(0, 0.1)
            d.b_dec.normal_(0, 0.1)
        dicts[s] = d.double()
    return dicts


def pair(batch=2, pos=5, swap=(1, 3), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 250, (batch, pos), generator=g)
    cf = ids.clone()
    for q in swap:
        cf[:, q] = torch.randint(2, 250, (batch,), generator=g)
    return ids, cf
