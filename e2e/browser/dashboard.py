#!/usr/bin/env python3
"""Opens pilot's dashboard in headless Chromium and checks the live service graph.

    dashboard.py BASE_URL SCREENSHOT_PATH [--expect app1,app2,...] [--timeout 60]

Loads BASE_URL/dashboard and polls, until --timeout seconds have passed, for:
  - a graph node (g.node[data-app=APP]) for every expected app, and
  - for every expected app, an edge with requests/s > 0 into or out of one of
    its nodes.
Without --expect it waits for at least one node.
Then it clicks a service in the side panel, checks that the service view
shows that service's host, goes back to the graph and saves a full-page
screenshot (1440x900 viewport). It prints the nodes and the edges it saw.

Exit status: 0 when all of the above held; 1 when something did not (what
the page showed is printed, and the screenshot is saved all the same);
2 when Chromium or Playwright is missing.

Chromium comes from the system (Debian's `chromium` package), found on PATH
or through $CHROMIUM; Playwright's own browser download is not used.
"""

import argparse
import os
import shutil
import sys
import threading
import time

SNAPSHOT_JS = """() => {
  const nodes = [...document.querySelectorAll('#graph g.node')].map((g) => ({
    id: g.getAttribute('data-id'), app: g.getAttribute('data-app'),
    kind: g.getAttribute('data-kind'), idle: g.classList.contains('idle'),
  }));
  const edges = [...document.querySelectorAll('#graph g.edge')].map((g) => ({
    source: g.getAttribute('data-source'), target: g.getAttribute('data-target'),
    rps: parseFloat(g.getAttribute('data-rps')), errorRate: g.getAttribute('data-error-rate'),
    service: g.getAttribute('data-service'),
  }));
  const services = [...document.querySelectorAll('.service[data-host]')].map((li) => li.getAttribute('data-host'));
  const live = document.querySelector('#live-text');
  return { nodes, edges, services, live: live ? live.textContent : null };
}"""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base_url")
    parser.add_argument("screenshot")
    parser.add_argument("--expect", default="", help="comma-separated app names that must appear with traffic")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the graph (default 60)")
    parser.add_argument(
        "--traffic",
        default="",
        help="a URL to GET about 20 times a second while the test runs (e.g. the gateway's /productpage)",
    )
    args = parser.parse_args(argv)
    args.expect = [a.strip() for a in args.expect.split(",") if a.strip()]
    args.base_url = args.base_url.rstrip("/")
    return args


def missing(snapshot, expect):
    """What the graph still lacks, as readable lines (empty when complete)."""
    if not expect:
        return [] if snapshot["nodes"] else ["no node in the graph"]
    app_of = {n["id"]: n["app"] for n in snapshot["nodes"]}
    apps = set(app_of.values())
    busy = set()
    for e in snapshot["edges"]:
        if e["rps"] > 0:
            busy.add(app_of.get(e["source"]))
            busy.add(app_of.get(e["target"]))
    lacks = [f"no node for app {a!r}" for a in expect if a not in apps]
    lacks += [f"no edge with traffic at app {a!r}" for a in expect if a in apps and a not in busy]
    return lacks


def report(snapshot):
    app_of = {n["id"]: n["app"] for n in snapshot["nodes"]}
    print(f"nodes ({len(snapshot['nodes'])}):")
    for n in sorted(snapshot["nodes"], key=lambda n: n["id"] or ""):
        flags = " (no traffic)" if n["idle"] else ""
        print(f"  {n['id']}  app={n['app']}  kind={n['kind']}{flags}")
    print(f"edges ({len(snapshot['edges'])}):")
    for e in sorted(snapshot["edges"], key=lambda e: (e["source"] or "", e["target"] or "")):
        err = e["errorRate"]
        err = f"{float(err) * 100:.1f}% err" if err not in (None, "") else "err unknown"
        print(f"  {e['source']} -> {e['target']}  {e['rps']:.1f} rps  {err}  ({app_of.get(e['source'])} -> {app_of.get(e['target'])})")
    print(f"services: {', '.join(snapshot['services']) or '(none)'}")
    print(f"status: {snapshot['live']}")


def check_service_view(page, snapshot, expect, deadline):
    """Clicks a service, checks its view, goes back. Returns a problem or None."""
    hosts = snapshot["services"]
    if not hosts:
        return "the services list is empty"
    short = {h: h.split(".")[0] for h in hosts}
    host = next((h for h in hosts if short[h] in expect), hosts[0])
    page.click(f'.service[data-host="{host}"]')
    view = page.locator("#service-view")
    try:
        view.wait_for(state="visible", timeout=max(1000, (deadline - time.monotonic()) * 1000))
        page.wait_for_function(
            "(host) => { const v = document.querySelector('#service-view'); return v && v.textContent.includes(host); }",
            arg=host, timeout=5000)
    except Exception:
        return f"clicking service {host} did not show #service-view with its host"
    if "#service=" not in page.url:
        return f"the service view is not addressable (url {page.url})"
    print(f"service view: {host} (url {page.url[len(page.url.split('#')[0]):]})")
    page.go_back()
    try:
        view.wait_for(state="hidden", timeout=5000)
        page.locator(f'.service[data-host="{host}"]').wait_for(state="visible", timeout=5000)
    except Exception:
        return "going back did not return to the graph and the services list"
    return None


def main(argv):
    args = parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("playwright is not installed: pip install -r e2e/browser/requirements.txt", file=sys.stderr)
        return 2
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        print("chromium is not installed (apt-get install chromium), or set $CHROMIUM", file=sys.stderr)
        return 2

    stop = threading.Event()
    if args.traffic:
        threading.Thread(target=send_traffic, args=(args.traffic, stop), daemon=True).start()
    try:
        return run(args, chromium)
    finally:
        stop.set()


def send_traffic(url, stop):
    """GETs `url` every 50 ms until `stop` (bounded by the test's timeout)."""
    import urllib.request

    while not stop.is_set():
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                resp.read()
        except OSError:
            pass
        stop.wait(0.05)


def run(args, chromium):
    from playwright.sync_api import sync_playwright

    url = args.base_url + "/dashboard"
    deadline = time.monotonic() + args.timeout
    problems = []
    page_errors = []
    with sync_playwright() as pw:
        launch_args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=launch_args)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.on("pageerror", lambda e: page_errors.append(str(e)))

        snapshot = {"nodes": [], "edges": [], "services": [], "live": None}
        try:
            page.goto(url, wait_until="domcontentloaded", timeout=max(1000, args.timeout * 1000))
        except Exception as e:
            problems.append(f"could not load {url}: {str(e).splitlines()[0]}")
        else:
            page.locator("svg#graph").wait_for(state="attached", timeout=10_000)
            lacks = ["nothing seen yet"]
            while True:
                snapshot = page.evaluate(SNAPSHOT_JS)
                lacks = missing(snapshot, args.expect)
                if not lacks or time.monotonic() >= deadline:
                    break
                page.wait_for_timeout(500)
            if lacks:
                problems.append(f"after {args.timeout:g} s: " + "; ".join(lacks))
            else:
                problem = check_service_view(page, snapshot, args.expect, deadline)
                if problem:
                    problems.append(problem)
                else:
                    # Let the graph settle after leaving the service view.
                    page.wait_for_function("() => !document.querySelector('#graph.focusing')", timeout=5000)
                    snapshot = page.evaluate(SNAPSHOT_JS)
            page.mouse.move(0, 0)  # no hover highlight in the picture
            page.screenshot(path=args.screenshot, full_page=True)
            print(f"screenshot: {args.screenshot}")
        browser.close()

    report(snapshot)
    problems += [f"uncaught error in the page: {e}" for e in page_errors]
    for p in problems:
        print(f"FAIL: {p}")
    if problems:
        return 1
    print("ok: every expected app is in the graph with traffic" if args.expect else "ok: the graph shows the mesh")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
