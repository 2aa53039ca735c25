"""Feature dashboards: static HTML pages per dictionary feature (density, activation histogram,
top and quantile contexts with per-token highlights, logit effects, neuron alignment, correlated
features, autointerp explanation and scores), an index with search and sorting, Neuronpedia-
compatible JSON, and links from circuit graphs to the pages.

    from circuits.dashboards import dashboard_links, graph_features, render_dashboards
    for site, ids in graph_features(graph).items():          # the circuit's feature nodes
        render_dashboards(model, saes[site], cache, "out/dashboards", site=site, features=ids)
    render(graph, "out/circuit.svg", links=dashboard_links(graph, "dashboards/"))

From the shell: `python -m circuits.dashboards --cache DIR --dictionary DIR --site resid.3 --out DIR`.
"""
from .data import FeatureView, feature_view, logit_effects, neuron_alignment, unembedding
from .links import dashboard_links, graph_features
from .neuronpedia import neuronpedia_feature
from .page import feature_page
from .render import page_path, render_dashboards, site_dir, write_index
from .text import esc, visible

__all__ = ["render_dashboards", "dashboard_links", "graph_features", "write_index", "page_path", "site_dir",
           "FeatureView", "feature_view", "feature_page", "neuronpedia_feature", "logit_effects", "neuron_alignment",
           "unembedding", "esc", "visible"]
