"""Benchmark runners (interventions.runners): IOI feature patching and pronoun erasure on a tiny
model with toy datasets of the same interface, files written and consistent with the returned
numbers, the CLIs' --help, and (slow) both runners on SmolLM2 with real prompts at minimal sizes."""
import math
import subprocess
import sys
from dataclasses import dataclass, field

import pandas as pd
import pytest
import torch

from interventions.runners import build_families, check_families, fit_baselines
from interventions.runners import erasure_bench as eb
from interventions.runners import ioi_patching as ip
from interventions.runners import report as rp
from interventions.spliced import run_spliced
from interventions.tasks import logit_diff
from sae.architectures import TopKSAE
from sae.baselines import IdentityDictionary
from sae.models import tiny_model

SITES = ["resid.0", "resid.1"]


@pytest.fixture(scope="module")
def model():
    # a larger init scale than the default, so patches and erasures move the logits visibly
    return tiny_model("llama", n_layers=2, d_model=32, initializer_range=0.3)


@pytest.fixture(scope="module")
def families(model):
    """TopK SAEs (random, 96 latents) and PCA / neuron baselines fitted on random-token activations."""
    torch.manual_seed(0)
    ids = torch.randint(2, 250, (64, 8), generator=torch.Generator().manual_seed(1))
    run = run_spliced(model, {s: IdentityDictionary(32) for s in SITES}, ids, logits=False)
    sample = {s: run.acts[s][:, 1:].reshape(-1, 32) for s in SITES}
    saes = {}
    for s in SITES:
        d = TopKSAE(32, 96, k=8)
        with torch.no_grad():
            d.b_enc.normal_(0, 0.1)
        saes[s] = d
    return {"sae": saes, **fit_baselines(sample, ["pca", "neurons"])}


@dataclass
class ToyIOI:
    """The IOIDataset interface on random byte tokens: clean and counterfactual ids that differ
    from position 2 on, answers = two token ids per prompt."""

    input_ids: torch.Tensor
    cf_input_ids: torch.Tensor
    io_ids: torch.Tensor
    s_ids: torch.Tensor
    counterfactual: str = "replace_io"

    @property
    def end_pos(self):
        return torch.full((len(self.input_ids),), self.input_ids.shape[1] - 1)

    def __len__(self):
        return len(self.input_ids)

    def answer_ids(self, counterfactual=False):
        assert not counterfactual
        return self.io_ids, self.s_ids


@pytest.fixture(scope="module")
def toy_ioi():
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(2, 250, (3, 7), generator=g)
    cf = clean.clone()
    cf[:, 2:] = torch.randint(2, 250, (3, 5), generator=g)
    return ToyIOI(clean, cf, torch.tensor([10, 20, 30]), torch.tensor([40, 50, 60]))


@dataclass
class ToyPronouns:
    """The PronounDataset interface: positions 1.. hold 'name' tokens from one of two sets (the
    planted concept), the answers are token 100 (' he') or 101 (' she')."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    splits: list = field(default_factory=list)
    he_id: int = 100
    she_id: int = 101

    def __len__(self):
        return len(self.input_ids)

    def split(self, which):
        keep = [i for i, s in enumerate(self.splits) if s == which]
        return ToyPronouns(self.input_ids[keep], self.labels[keep], [which] * len(keep))

    @property
    def end_pos(self):
        return torch.full((len(self),), self.input_ids.shape[1] - 1)

    @property
    def word_idx(self):
        return {"NAME": torch.ones(len(self), dtype=torch.long), "END": self.end_pos}

    def answer_ids(self, counterfactual=False):
        he = self.labels > 0
        return torch.where(he, self.he_id, self.she_id), torch.where(he, self.she_id, self.he_id)


@pytest.fixture(scope="module")
def toy_pronouns():
    g = torch.Generator().manual_seed(5)
    n = 48
    labels = torch.tensor([1, -1] * (n // 2))
    ids = torch.randint(2, 250, (n, 6), generator=g)
    male, female = torch.randint(30, 33, (n, 5), generator=g), torch.randint(60, 63, (n, 5), generator=g)
    ids[:, 1:] = torch.where(labels[:, None] > 0, male, female)
    return ToyPronouns(ids, labels, ["train"] * 32 + ["heldout"] * 16)


def _num(cell):
    return math.nan if cell == rp.MISSING else float(cell)


# --- IOI patching ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ioi_result(model, families, toy_ioi, tmp_path_factory):
    out = tmp_path_factory.mktemp("ioi")
    curves = ip.run_ioi_patching(model, families, SITES, dataset=toy_ioi, candidates=6, taus=[1e-3, 1e-2, 1e-1, 10.0],
                                 batch=4, out_dir=out, progress=False)
    return curves, out


def test_ioi_curves_have_endpoints_and_a_nested_search(ioi_result, toy_ioi, model):
    curves, _ = ioi_result
    assert set(zip(curves.site, curves.family)) == {(s, f) for s in SITES for f in ("sae", "pca", "neurons")}
    full_rank = curves[curves.family == "pca"]           # 32 components of a 32-wide site: no error term
    assert full_rank.delta_in_error.max() < 1e-9 and (full_rank.delta_in_candidates < 1).all()
    assert (curves[curves.family == "sae"].delta_in_error > 0.01).all()   # a random SAE leaves much in the error
    for (site, fam), g in curves.groupby(["site", "family"]):
        none, every = g[g.point == "none"].iloc[0], g[g.point == "all"].iloc[0]
        search = g[g.point == "search"].sort_values("tau")
        assert none.n_features == 0 and none.edit_l2 == 0 and none.restored == 0
        assert every.n_features == 6 and every.edit_l2 > 0
        assert len(search) == 4
        # sets shrink as tau grows and are nested; the largest tau (10 nats) drops everything
        sets = [set(f) for f in search.features]
        assert all(b <= a for a, b in zip(sets, sets[1:]))
        assert list(search.n_features) == [len(s) for s in sets] and sets[-1] == set()
        assert sets[0] <= set(every.features)
        assert search.kl.iloc[-1] == pytest.approx(none.kl)
    # the clean logit difference of the target (clean) run is what "restored" is measured against
    with torch.no_grad():
        clean = model.hf(input_ids=toy_ioi.input_ids).logits
    assert curves.metric_target.iloc[0] == pytest.approx(float(logit_diff(clean, toy_ioi).mean()), rel=1e-4)


def test_ioi_neuron_basis_with_every_differing_neuron_restores_the_clean_run(model, families, toy_ioi):
    curves = ip.run_ioi_patching(model, {"neurons": families["neurons"]}, ["resid.0"], dataset=toy_ioi,
                                 candidates=None, taus=[10.0], batch=64, progress=False)
    every = curves[curves.point == "all"].iloc[0]
    assert every.n_features == 32                     # every neuron differs at the changed positions
    assert every.kl < 1e-6 and every.restored == pytest.approx(1.0, abs=1e-3)
    assert every.delta_in_error == pytest.approx(0, abs=1e-9) and every.delta_in_candidates == pytest.approx(1)
    assert every.fvu == pytest.approx(0, abs=1e-9)
    assert curves[curves.point == "none"].kl.iloc[0] > 0.01


def test_ioi_clean_to_cf_swaps_base_and_target(model, families, toy_ioi):
    curves = ip.run_ioi_patching(model, {"pca": families["pca"]}, ["resid.1"], dataset=toy_ioi, candidates=4,
                                 taus=[0.1], batch=4, direction="clean_to_cf", order="ascending", progress=False)
    with torch.no_grad():
        clean = logit_diff(model.hf(input_ids=toy_ioi.input_ids).logits, toy_ioi).mean()
        cf = logit_diff(model.hf(input_ids=toy_ioi.cf_input_ids).logits, toy_ioi).mean()
    none = curves[curves.point == "none"].iloc[0]
    assert none.metric == pytest.approx(float(clean), rel=1e-4)          # base = the clean prompt
    assert none.metric_target == pytest.approx(float(cf), rel=1e-4)      # target = the counterfactual
    assert curves.attrs["stats"]["clean_logit_diff"] == pytest.approx(float(clean), rel=1e-4)


def test_ioi_files_agree_with_the_dataframe(ioi_result):
    curves, out = ioi_result
    files = curves.attrs["files"]
    assert {p.name for p in files.values()} == {"ioi_patching.csv", "ioi_patching_summary.csv", "ioi_patching.png",
                                                "ioi_patching.md"}
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and files["png"].stat().st_size > 10_000
    csv = pd.read_csv(files["csv"])
    assert len(csv) == len(curves)
    for col in ("n_features", "kl", "restored", "edit_l2"):
        assert csv[col].to_numpy() == pytest.approx(curves[col].to_numpy(), rel=1e-9, nan_ok=True)
    assert csv.features.fillna("").tolist() == [" ".join(map(str, f)) for f in curves.features]
    # the summary recomputed from the CSV equals the written summary and the markdown tables
    again = ip.summarise(csv)
    summary = pd.read_csv(files["summary_csv"])
    pd.testing.assert_frame_equal(again.reset_index(drop=True), summary, check_dtype=False, rtol=1e-9)
    tables = rp.read_markdown_tables(files["md"].read_text())
    assert len(tables) == len(SITES)
    for site, table in zip(SITES, tables):
        rows = summary[summary.site == site]
        assert table["family"].tolist() == rows.family.tolist()
        assert [_num(c) for c in table["KL none"]] == pytest.approx(rows.kl_none.round(3).tolist(), abs=1e-9)
        assert [_num(c) for c in table["KL all cand."]] == pytest.approx(rows.kl_all.round(3).tolist(), abs=1e-9)
        for lvl, head in ((0.5, "min F: KL<=50%"), (0.1, "min F: KL<=10%"), (0.5, "min F: restored>=50%")):
            col = ip._level_name("min_f_kl" if "KL" in head else "min_f_restored", lvl)
            assert [_num(c) for c in table[head]] == pytest.approx(rows[col].tolist(), nan_ok=True)


def test_ioi_minimum_feature_counts_follow_from_the_curves(ioi_result):
    curves, _ = ioi_result
    summary = curves.attrs["summary"]
    for row in summary.itertuples():
        g = curves[(curves.site == row.site) & (curves.family == row.family)]
        hit = g[g.kl <= 0.5 * row.kl_none].n_features
        assert (row.min_f_kl_50 == hit.min()) if len(hit) else math.isnan(row.min_f_kl_50)
        assert row.kl_all == pytest.approx(g[g.point == "all"].kl.iloc[0])


def test_ioi_rejects_bad_arguments(model, families, toy_ioi):
    with pytest.raises(ValueError, match="direction"):
        ip.run_ioi_patching(model, families, SITES, dataset=toy_ioi, direction="sideways", progress=False)
    with pytest.raises(ValueError, match="no dictionary at"):
        ip.run_ioi_patching(model, {"pca": {"resid.0": families["pca"]["resid.0"]}}, SITES, dataset=toy_ioi,
                            progress=False)
    with pytest.raises(ValueError, match="not a site"):
        check_families(model, families, ["resid.7"])


# --- erasure ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def erasure_result(model, families, toy_pronouns, tmp_path_factory):
    out = tmp_path_factory.mktemp("erasure")
    neutral = torch.randint(2, 250, (3, 10), generator=torch.Generator().manual_seed(9))
    df = eb.run_erasure_bench(model, families, ["resid.0"], dataset=toy_pronouns, ks=[1, 4, 64], neutral=neutral,
                              out_dir=out, progress=False)
    return df, out


def test_erasure_rows_cover_every_method(erasure_result):
    df, _ = erasure_result
    got = sorted(zip(df.method, df.k))
    # k=64 is skipped for the 32-dimensional PCA and neuron dictionaries
    assert got == sorted([("none", 0), ("sae", 1), ("sae", 4), ("sae", 64), ("pca", 1), ("pca", 4), ("neurons", 1),
                          ("neurons", 4), ("leace", 1), ("mean_diff", 1)])
    none = df[df.method == "none"].iloc[0]
    assert none.edit_l2 == 0 and none.kl_neutral == 0
    assert none.probe_acc >= 0.8                          # the planted concept is linearly readable
    edits = df[df.method != "none"]
    assert (edits.edit_l2 > 0).all() and (edits.kl_neutral > 0).all()
    assert [len(f) for f in edits.features[edits.family != ""]] == list(edits.k[edits.family != ""])
    fvu = df.attrs["summary"].set_index("method").fvu
    assert fvu["neurons"] == pytest.approx(0, abs=1e-9) and fvu["sae"] > 0.01 and math.isnan(fvu["leace"])


def test_leace_guards_the_concept_against_a_retrained_probe(erasure_result):
    df, _ = erasure_result
    leace = df[df.method == "leace"].iloc[0]
    assert leace.probe_acc_retrained <= leace.chance + 0.2
    assert leace.probe_acc < df[df.method == "none"].probe_acc.iloc[0]


def test_erasure_files_agree_with_the_dataframe(erasure_result):
    df, _ = erasure_result
    files = df.attrs["files"]
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = pd.read_csv(files["csv"])
    for col in ("accuracy", "two_way_probability", "edit_l2", "kl_neutral", "probe_acc"):
        assert csv[col].to_numpy() == pytest.approx(df[col].to_numpy(), rel=1e-9, nan_ok=True)
    summary = pd.read_csv(files["summary_csv"])
    pd.testing.assert_frame_equal(eb.summarise(csv), summary.drop(columns="fvu"), check_dtype=False, rtol=1e-9)
    assert summary.fvu.tolist() == pytest.approx(df.attrs["summary"].fvu.tolist(), nan_ok=True)
    rows_md, sum_md = rp.read_markdown_tables(files["md"].read_text())
    assert rows_md["method"].tolist() == df.method.tolist()
    for head, col, spec in (("accuracy", "accuracy", ".3f"), ("edit L2", "edit_l2", ".3g"),
                            ("KL neutral", "kl_neutral", ".3g"), ("probe acc", "probe_acc", ".3f")):
        assert rows_md[head].tolist() == [rp.fmt(v, spec) for v in df[col]]
    assert [_num(c) for c in sum_md["lowest accuracy"]] == pytest.approx(summary.min_accuracy.round(3).tolist())
    assert [_num(c) for c in sum_md["FVU"]] == pytest.approx(summary.fvu.round(2).tolist(), nan_ok=True)


def test_erasure_summary_follows_from_the_rows(erasure_result):
    df, _ = erasure_result
    for row in df.attrs["summary"].itertuples():
        g = df[(df.site == row.site) & (df.method == row.method)]
        assert row.min_accuracy == g.accuracy.min()
        hit = g[g.accuracy <= df.attrs["accuracy_level"]]
        assert (row.min_kl_at_level == hit.kl_neutral.min()) if len(hit) else math.isnan(row.min_kl_at_level)


def test_token_labels_and_bad_arguments(toy_pronouns, model, families):
    z = eb.token_labels(toy_pronouns, "name_to_end")
    assert (z[:, 0] == -1).all() and (z[:, 1:] >= 0).all()
    assert z[0, 1] != z[1, 1]                              # opposite genders, opposite classes
    assert (eb.token_labels(toy_pronouns, "end")[:, :-1] == -1).all()
    name = eb.token_labels(toy_pronouns, "name")
    assert (name[:, 1] == z[:, 1]).all() and (name[:, 2:] == -1).all() and (name[:, 0] == -1).all()
    with pytest.raises(ValueError, match="linear erasers"):
        eb.run_erasure_bench(model, families, ["resid.0"], dataset=toy_pronouns, linear=["inlp"], progress=False)
    with pytest.raises(ValueError, match="fit_positions"):
        eb.token_labels(toy_pronouns, "everywhere")


# --- shared pieces -------------------------------------------------------------------------------------
def test_markdown_tables_round_trip():
    df = pd.DataFrame({"a": ["x", "y"], "b": [1.23456, math.nan], "c": [3, 4]})
    text = "intro\n\n" + rp.markdown_table(df, ["a", "b", "c"], {"b": ".2f"}) + "\n\nend"
    (table,) = rp.read_markdown_tables(text)
    assert table.to_dict("list") == {"a": ["x", "y"], "b": ["1.23", rp.MISSING], "c": ["3", "4"]}
    assert [rp.fmt(v, "d") for v in (3.0, 2.5, math.nan, 7)] == ["3", "2.5", rp.MISSING, "7"]
    with pytest.raises(KeyError, match="not in the table"):
        rp.markdown_table(df, ["a", "zzz"])


def test_build_families_rejects_unknown_names(model):
    with pytest.raises(ValueError, match="unknown families"):
        build_families(model, ["resid.0"], ["sae", "nmf"])


@pytest.mark.parametrize("module", ["ioi_patching", "erasure_bench"])
def test_cli_help(module):
    done = subprocess.run([sys.executable, "-m", f"interventions.runners.{module}", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--sites" in done.stdout and "--out" in done.stdout and "--n-prompts" in done.stdout


# --- SmolLM2, real prompts, minimal sizes ----------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_baselines(smollm2):
    from interventions.runners import harvest_sample, load_corpus_for

    corpus = load_corpus_for(smollm2, 1024)
    sample = harvest_sample(smollm2, corpus.train, ["resid.2"], 1024)
    return fit_baselines(sample, ["pca", "neurons"]), corpus


@pytest.mark.slow
def test_ioi_patching_on_smollm2(smollm2, smol_baselines, tmp_path):
    fams, _ = smol_baselines
    curves = ip.run_ioi_patching(smollm2, fams, ["resid.2"], n_prompts=2, candidates=4, taus=[0.05, 1.0], batch=4,
                                 out_dir=tmp_path, progress=False)
    s = curves.attrs["stats"]
    assert s["clean_logit_diff"] > 0 and s["clean_logit_diff"] > s["cf_logit_diff"]
    for fam in ("pca", "neurons"):
        g = curves[curves.family == fam]
        every = g[g.point == "all"].iloc[0]
        assert every.kl < g[g.point == "none"].kl.iloc[0]          # patching toward the clean run helps
        assert every.restored > 0
    assert (tmp_path / "ioi_patching.md").read_text().count("## resid.2") == 1


@pytest.mark.slow
def test_erasure_bench_on_smollm2(smollm2, smol_baselines, tmp_path):
    fams, corpus = smol_baselines
    df = eb.run_erasure_bench(smollm2, {"pca": fams["pca"]}, ["resid.2"], n_prompts=16, ks=[2],
                              neutral=corpus.heldout[:1, :32], out_dir=tmp_path, progress=False)
    none, leace = df[df.method == "none"].iloc[0], df[df.method == "leace"].iloc[0]
    assert none.accuracy >= 0.75                                 # SmolLM2 predicts the pronoun
    assert leace.probe_acc_retrained <= leace.chance + 0.25
    assert leace.kl_neutral > 0 and (tmp_path / "erasure_bench.png").exists()
