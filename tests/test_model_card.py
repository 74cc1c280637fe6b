"""``/v1/models/{m}/functions`` and the HTML model card, on real servers and in a real browser.

The browser is Debian's ``chromium`` run headless: ``--dump-dom`` gives the DOM the browser
built from the page (so broken markup that a string search would miss shows up as wrong
counts), ``--screenshot`` the picture the README shows. Without chromium the browser test
skips on a developer machine and fails in CI (``CI`` set).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import httpx
import numpy as np
import pytest

from kanmoe.paths import PROJECT_ROOT
from kanmoe.service.card import CARD_EDGES, render_card
from kanmoe.service.model_spec import GateLayer, ModelSpec
from tests.serving import DEFAULT_MODEL, DEFAULT_REPOSITORY, copy_repository

FUNCTIONS = DEFAULT_REPOSITORY / DEFAULT_MODEL / "1" / "functions.json"
DOCS_SCREENSHOT = PROJECT_ROOT / "docs" / "images" / "model_card.png"
ROWS = [
    [8.3252, 41.0, 6.98, 1.02, 322.0, 2.56, 37.88, -122.23],
    [2.1, 20.0, 4.0, 1.1, 1500.0, 3.2, 34.05, -118.25],
    [5.0, 30.0, 5.5, 1.0, 900.0, 2.8, 38.5, -121.5],
    [1.5, 45.0, 3.9, 1.2, 2500.0, 4.1, 33.9, -117.9],
]


class _Elements(HTMLParser):
    """Every start tag with its attributes, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _elements(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Elements()
    parser.feed(html)
    return parser.tags


def _with_class(tags, tag: str, cls: str) -> list[dict[str, str | None]]:
    return [a for t, a in tags if t == tag and cls in (a.get("class") or "").split()]


@pytest.fixture(scope="module")
def shipped() -> dict:
    return json.loads(FUNCTIONS.read_text())


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    """A private server: version 1 with functions.json, version 2 exported without it."""
    from tests.serving import start_server

    repo = copy_repository(tmp_path_factory.mktemp("card") / "repo")
    model = repo / DEFAULT_MODEL
    shutil.copytree(model / "1", model / "2")
    (model / "2" / "functions.json").unlink()
    server = start_server(repo)
    yield server
    server.stop()


def _expected_panels(doc: dict) -> dict[tuple[str, str], int]:
    """(layer label, input index) -> curves the card draws, for every first KAN layer."""
    out = {}
    for layer in doc["layers"]:
        if layer["depth"] != 0:
            continue
        for inp in layer["inputs"]:
            edges = [e for e in layer["edges"] if e["in"] == inp["index"]]
            out[(layer["label"], str(inp["index"]))] = min(CARD_EDGES, len(edges))
    return out


# -- /functions ---------------------------------------------------------------------------


def test_functions_route_serves_the_exported_file(default_server, shipped):
    for path in ("functions", "versions/1/functions"):
        r = httpx.get(f"{default_server.url}/v1/models/{DEFAULT_MODEL}/{path}", timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.content == FUNCTIONS.read_bytes()
        assert r.json() == shipped


def test_functions_missing_is_a_clear_404(two_versions):
    url = f"{two_versions.url}/v1/models/{DEFAULT_MODEL}"
    r = httpx.get(f"{url}/versions/2/functions", timeout=30)
    assert r.status_code == 404
    assert r.json() == {
        "error": f"model '{DEFAULT_MODEL}' version 2 was exported without functions.json; "
        "re-export with kanmoe export"
    }
    assert httpx.get(f"{url}/functions", timeout=30).status_code == 404  # newest: version 2
    assert httpx.get(f"{url}/versions/1/functions", timeout=30).status_code == 200
    assert httpx.get(f"{url}/versions/9/functions", timeout=30).status_code == 404
    unknown = httpx.get(f"{two_versions.url}/v1/models/nope/card", timeout=30)
    assert unknown.status_code == 404 and "unknown model" in unknown.json()["error"]
    # the card of a version without functions still renders, and says why it has no plots
    card = httpx.get(f"{url}/versions/2/card", timeout=30)
    assert card.status_code == 200
    assert "exported without functions.json" in card.text
    assert not _with_class(_elements(card.text), "svg", "kan-panel")


# -- /card --------------------------------------------------------------------------------


def test_card_shows_metrics_experts_ranges_and_live_traffic(two_versions, shipped):
    url = f"{two_versions.url}/v1/models/{DEFAULT_MODEL}/versions/1"
    weights = []
    for i in range(6):
        r = httpx.post(f"{url}/predict", json={"inputs": ROWS[i % 4 :] + ROWS[: i % 4]})
        assert r.status_code == 200, r.text
        weights += r.json()["gate_weights"]["moe"]
    card = httpx.get(f"{url}/card", timeout=30)
    assert card.status_code == 200
    assert card.headers["content-type"].startswith("text/html")
    text = card.text
    spec = json.loads((DEFAULT_REPOSITORY / DEFAULT_MODEL / "1" / "kanmoe.json").read_text())
    assert f"{spec['metrics']['test']['r2']:.4g}" in text
    for feature, (lo, hi) in spec["feature_ranges"].items():
        assert f"<tr><td>{feature}</td><td>{lo:.4g}</td><td>{hi:.4g}</td>" in text
    assert "http://" not in text and "https://" not in text  # nothing loaded from outside
    assert "<script" not in text and "<link" not in text
    # live shares equal what the predict answers themselves said (independent reference)
    w = np.asarray(weights)
    rows = _with_class(_elements(text), "tr", "expert")
    assert [r["data-expert"] for r in rows] == spec["expert_names"]["moe"]
    top1 = np.bincount(w.argmax(1), minlength=w.shape[1]) / len(w)
    for e, row in enumerate(rows):
        assert float(row["data-live-mean"]) == pytest.approx(w[:, e].mean(), abs=1e-5)
        assert float(row.get("data-live-top1") or 0.0) == pytest.approx(top1[e], abs=1e-9)
        ref = spec["gate_reference"]["moe"]["shares"][e]
        assert float(row["data-ref-mean"]) == pytest.approx(ref)
    assert f"live: {len(w):,} rows served" in text
    # one panel per (first KAN layer, input), as in functions.json
    panels = _with_class(_elements(text), "svg", "kan-panel")
    assert {(p["data-layer"], p["data-input"]) for p in panels} == set(_expected_panels(shipped))


def test_card_escapes_every_string_from_files():
    evil = '<script>alert("x")</script>'
    spec = ModelSpec(
        name="m<x-name>",
        version="1",
        feature_names=(evil, "a&b"),
        target_names=("<x-target>",),
        gates=(GateLayer('l"ayer', "gate_weights", ("<img src=x>", "<x-expert>"), (0.5, 0.5)),),
        feature_ranges={evil: (0.0, 1.0), "a&b": (2.0, 3.0)},
        metrics={"<x-split>": {"<x-col>": 0.5}, "note": "<iframe>"},
        kanmoe_version="<x-ver>",
        config_hash="<x-hash>",
    )
    doc = {
        "data": {"source": "<x-source>", "rows": 3},
        "layers": [
            {
                "label": "<svg onload=x>",
                "role": "expert",
                "depth": 0,
                "basis": "<x-basis>",
                "in_features": 1,
                "out_features": 1,
                "spread": [[1.0]],
                "inputs": [
                    {"index": 0, "name": evil, "units": "raw", "x": [0, 1], "density": [1.0]}
                ],
                "edges": [{"in": 0, "out": "<x-out>", "y": [0.0, 1.0]}],
            }
        ],
        "symbolic": {"formulas": [{"module": "<x-module>", "formula": ["<x-formula>"]}]},
    }
    page = render_card(spec, doc, {})
    for raw in (evil, "<img", "<iframe>", "<svg onload", 'l"ayer'):
        assert raw not in page, raw
    assert "<x-" not in page  # every marker above came out escaped
    markers = ["name", "target", "expert", "split", "col", "ver", "hash", "source", "basis"]
    for marker in [*markers, "out", "module", "formula"]:
        assert f"&lt;x-{marker}&gt;" in page, marker  # shown, escaped
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    tags = _elements(page)
    assert [t for t, _ in tags if t in ("script", "img", "iframe")] == []
    assert len(_with_class(tags, "svg", "kan-panel")) == 1


# -- in a real browser ----------------------------------------------------------------------


def _chromium() -> str | None:
    return next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p),
        None,
    )


def _browser(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def test_card_in_headless_chromium(two_versions, shipped, tmp_path):
    binary = _chromium()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt-get install chromium); CI needs it")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    url = f"{two_versions.url}/v1/models/{DEFAULT_MODEL}/versions/1"
    for row in ROWS:  # some live traffic for the shares
        httpx.post(f"{url}/predict", json={"inputs": [row] * 5}).raise_for_status()
    dom = _browser(binary, tmp_path / "profile", "--dump-dom", f"{url}/card").stdout
    tags = _elements(dom)
    expected = _expected_panels(shipped)
    panels = _with_class(tags, "svg", "kan-panel")
    assert len(panels) == len(expected) == 3 * 38 + 16
    assert {(p["data-layer"], p["data-input"]): int(p["data-edges"]) for p in panels} == expected
    # the browser parsed each panel as an SVG holding its curves (not as stray text)
    curves = _with_class(tags, "polyline", "edge")
    assert len(curves) == sum(expected.values())
    deeper = [layer["label"] for layer in shipped["layers"] if layer["depth"] > 0]
    assert [s["data-layer"] for s in _with_class(tags, "svg", "kan-summary")] == deeper

    shot = tmp_path / "model_card.png"
    _browser(
        binary,
        tmp_path / "profile",
        "--window-size=1280,2000",
        f"--screenshot={shot}",
        f"{url}/card",
    )
    assert _png_size(shot) == (1280, 2000)
    assert shot.stat().st_size > 100_000  # a drawn page, not a blank one (~10 kB)
    if os.environ.get("KANMOE_WRITE_DOCS") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)
