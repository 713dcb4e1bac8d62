"""The phases of hack/bench-operator (run by it, inside its private environment).

Usage: bench-operator.py OPERATOR_HTTP_PORT TOOLS_BIN_DIR N...
Prints each figure next to its baseline; with BENCH_WRITE_DOCS=1 writes the
generated block bench-operator of docs/src/benchmarks.md and
docs/src/bench-operator.svg.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

OP_PORT, BIN = sys.argv[1], sys.argv[2]
NS_LIST = [int(n) for n in sys.argv[3:]]
STATE = os.environ["ORDERPIPE_ENV_DIR"]
NATS_URL = os.environ["NATS_URL"].split(",")[0]
NATS_MON = os.environ["NATS_MONITOR_URL"]
STEADY = int(os.environ.get("BENCH_STEADY", "300"))
CREATE_RUNS = int(os.environ.get("BENCH_CREATE_RUNS", "3"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(*args, input=None, check=True):
    r = subprocess.run(args, input=input, capture_output=True, text=True)
    if check and r.returncode != 0:
        sys.exit(f"bench-operator: {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def jsbench(*args):
    out = sh(f"{BIN}/jsbench", "-server", NATS_URL, *args)
    return json.loads(out.strip().splitlines()[-1])


def http(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def operator_pid():
    pid = int(open(f"{STATE}/pids/order-operator.pid").read())
    # `env` execs the operator; if a wrapper forked, take its child.
    exe = os.readlink(f"/proc/{pid}/exe")
    if not exe.endswith("order-operator"):
        pid = int(sh("pgrep", "-P", str(pid)).split()[0])
    return pid


def cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_process():
    """CPU seconds so far of every process of the environment (and the operator)."""
    out = {}
    for f in sorted(os.listdir(f"{STATE}/pids")):
        name = f[: -len(".pid")]
        try:
            pid = operator_pid() if name == "order-operator" else int(open(f"{STATE}/pids/{f}").read())
            out[name] = cpu_seconds(pid)
        except (OSError, ValueError, IndexError):
            pass
    return out


def cpu_delta(before):
    """The CPU seconds each process used since `before`."""
    after = cpu_by_process()
    return {k: after[k] - before.get(k, 0.0) for k in after}


def largest_first(d, fmt="{:.1f}", least=0.05, top=None):
    items = [(k, v) for k, v in sorted(d.items(), key=lambda kv: -kv[1]) if v >= least]
    return ", ".join(f"{k} {fmt.format(v)}" for k, v in items[:top])


def rss_mib(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class Watch:
    """`kubectl get -w` of one kind, each line stamped as it arrives."""

    def __init__(self, ns, kind, template):
        self.lines = []
        self.p = subprocess.Popen(
            ["kubectl", "get", kind, "-n", ns, "-w", "--output-watch-events",
             "-o", "go-template=" + template],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append((time.monotonic(), line.split()))

    def stop(self):
        self.p.terminate()


PIPELINE_EVENTS = ('{{.type}} {{.object.metadata.name}} '
                   '{{range .object.status.conditions}}{{.type}}={{.status}} {{end}}{{"\\n"}}')
DEPLOYMENT_EVENTS = ('{{.type}} {{.object.metadata.name}} '
                     'available={{or .object.status.availableReplicas 0}}{{"\\n"}}')


def pipelines_yaml(ns, n, max_age="24h"):
    docs = []
    for i in range(n):
        docs.append(f"""apiVersion: orderpipeline.dev/v1alpha1
kind: OrderPipeline
metadata: {{name: p{i}, namespace: {ns}}}
spec:
  nats: {{url: "{NATS_URL}"}}
  stream: {{name: P{i}, subjects: ["P{i}.*"], maxAge: {max_age}, duplicateWindow: 30m, deletionPolicy: Delete}}
  consumer: {{filterSubject: P{i}.created}}
  workers: {{replicas: 1, poolSize: 10}}
""")
    return "---\n".join(docs)


def rendered_deployment():
    """The Deployment the operator renders for pipeline p0 of this bench, without
    what the API server and the controllers add: the baseline creates the same
    objects (labels, annotations, probes, env) directly."""
    ns = "render"
    sh("kubectl", "create", "namespace", ns)
    sh("kubectl", "apply", "--server-side", "-f", "-", input=pipelines_yaml(ns, 1))
    got = {}
    def rendered():
        r = subprocess.run(["kubectl", "get", "deployment", "-n", ns, "p0-workers", "-o", "json"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            got["d"] = json.loads(r.stdout)
        return "d" in got
    wait("the operator's Deployment of one pipeline", rendered, 60)
    sh("kubectl", "delete", "orderpipelines", "--all", "-n", ns)
    sh("kubectl", "delete", "namespace", ns, "--timeout=120s")
    d, md = got["d"], got["d"]["metadata"]
    annotations = {k: v for k, v in (md.get("annotations") or {}).items()
                   if k != "deployment.kubernetes.io/revision"}
    return json.dumps({"apiVersion": "apps/v1", "kind": "Deployment",
                       "metadata": {"name": md["name"], "labels": md.get("labels") or {},
                                    "annotations": annotations},
                       "spec": d["spec"]})


def deployments_yaml(ns, n, rendered):
    """N copies of the operator's Deployment (`rendered`), renamed b<i> (stream B<i>)."""
    docs = []
    for i in range(n):
        doc = re.sub(r"\bp0\b", f"b{i}", rendered)
        doc = re.sub(r"\bP0\b", f"B{i}", doc)
        d = json.loads(doc)
        d["metadata"]["namespace"] = ns
        # Not the operator's: its Deployment watch (by this label) leaves them alone.
        if "app.kubernetes.io/managed-by" in d["metadata"]["labels"]:
            d["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "kubectl"
        docs.append(d)
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})


def quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def wait(what, ok, timeout):
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            sys.exit(f"bench-operator: timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def baseline(n, run, rendered):
    ns = f"base-{n}-{run}"
    sh("kubectl", "create", "namespace", ns)
    dw = Watch(ns, "deployments", DEPLOYMENT_EVENTS)
    cpu0, req0, j0 = cpu_by_process(), apiserver_by_resource(), jetstream_api_total()
    t0 = time.monotonic()
    js = threading.Thread(target=lambda: results.setdefault(("js", n), jsbench("-prefix", "B", "-n", str(n), "create")))
    js.start()
    sh("kubectl", "apply", "--server-side", "-f", "-", input=deployments_yaml(ns, n, rendered))
    js.join()
    available = {}
    def all_available():
        for t, w in dw.lines:
            if len(w) >= 3 and w[2] == "available=1":
                available.setdefault(w[1], t)
        return len(available) >= n
    wait(f"{n} baseline Deployments available", all_available, 60 + 2 * n)
    cpu, req, jsapi = cpu_delta(cpu0), requests_delta(req0), jetstream_api_total() - j0
    dw.stop()
    t_js = results[("js", n)]["seconds"]
    per = [t - t0 for t in available.values()]
    total = max(max(per), t_js)
    jsbench("-prefix", "B", "-n", str(n), "delete")
    # Gone before the operator's turn, so that its figures are its own.
    sh("kubectl", "delete", "namespace", ns, f"--timeout={120 + n}s")
    return {"all_ready": total, "jetstream": t_js, "deployments": max(per),
            "p50": quantile(per, 0.5), "p99": quantile(per, 0.99), "cpu": cpu, "requests": req, "jetstream_api": jsapi}


def operator_create(n, run):
    ns = f"op-{n}-{run}"
    sh("kubectl", "create", "namespace", ns)
    pw = Watch(ns, "orderpipelines", PIPELINE_EVENTS)
    dw = Watch(ns, "deployments", DEPLOYMENT_EVENTS)
    r0 = operator_metric("orderoperator_reconciles_total")
    cpu0, req0, j0 = cpu_by_process(), apiserver_by_resource(), jetstream_api_total()
    prof = os.environ.get("BENCH_APISERVER_PROFILE")
    if prof:
        # A CPU profile of kube-apiserver over the first 20 s of the create.
        def capture():
            with open(prof, "wb") as f:
                subprocess.run(["kubectl", "get", "--raw", "/debug/pprof/profile?seconds=20"], stdout=f)
        threading.Thread(target=capture, daemon=True).start()
    t0 = time.monotonic()
    sh("kubectl", "apply", "--server-side", "-f", "-", input=pipelines_yaml(ns, n))
    topo, ready, deps = {}, {}, {}
    def done():
        for t, w in list(dw.lines):
            if len(w) >= 2:
                deps.setdefault(w[1][: -len("-workers")], t)
        for t, w in list(pw.lines):
            if len(w) < 2:
                continue
            c = dict(x.split("=", 1) for x in w[2:] if "=" in x)
            if c.get("StreamReady") == "True" and c.get("ConsumerReady") == "True" and w[1] in deps:
                topo.setdefault(w[1], max(t, deps[w[1]]))
            if c.get("Ready") == "True":
                ready.setdefault(w[1], t)
        return len(ready) >= n and len(topo) >= n
    wait(f"{n} pipelines Ready", done, 120 + 2 * n)
    cpu, req, jsapi = cpu_delta(cpu0), requests_delta(req0), jetstream_api_total() - j0
    pw.stop(); dw.stop()
    per_topo = [t - t0 for t in topo.values()]
    per_ready = [t - t0 for t in ready.values()]
    reconciles = operator_metric("orderoperator_reconciles_total") - r0
    reasons, ours = {}, 0
    listed = sh("kubectl", "get", "events.events.k8s.io", "-n", ns, "-o",
                'jsonpath={range .items[*]}{.reportingController} {.reason}{"\\n"}{end}')
    for line in listed.splitlines():
        who, _, r = line.partition(" ")
        reasons[r] = reasons.get(r, 0) + 1
        ours += who == "order-operator"
    return ns, {"topology": max(per_topo), "all_ready": max(per_ready),
                "p50": quantile(per_ready, 0.5), "p99": quantile(per_ready, 0.99),
                "reconciles": reconciles, "cpu": cpu, "requests": req, "jetstream_api": jsapi,
                "status_writes": sum(v for k, v in req.items() if k.endswith(" orderpipelines/status") and k.split()[0] in ("APPLY", "PATCH", "PUT")),
                "operator_events": ours, "events": largest_first(reasons, "{:.0f}", 1)}


def apiserver_request_totals():
    """(labels, count) of every apiserver_request_total series, all clients."""
    for line in sh("kubectl", "get", "--raw", "/metrics").splitlines():
        if line.startswith("apiserver_request_total{"):
            yield dict(re.findall(r'(\w+)="([^"]*)"', line)), float(line.rsplit(" ", 1)[1])


def apiserver_requests():
    counts = {}
    for labels, v in apiserver_request_totals():
        if labels.get("dry_run"):
            counts["dry-runs"] = counts.get("dry-runs", 0) + v
            continue
        counts[labels.get("verb", "?")] = counts.get(labels.get("verb", "?"), 0) + v
        if labels.get("resource") == "orderpipelines" and labels.get("subresource") == "status" and labels.get("verb") == "PATCH":
            counts["status-writes"] = counts.get("status-writes", 0) + v
        if labels.get("resource") == "deployments" and labels.get("verb") in ("PATCH", "APPLY"):
            counts["deployment-writes"] = counts.get("deployment-writes", 0) + v
    return counts


def apiserver_by_resource():
    """apiserver_request_total by verb and resource (dry runs apart), all clients."""
    counts = {}
    for labels, v in apiserver_request_totals():
        what = labels.get("resource", "?") + ("/" + labels["subresource"] if labels.get("subresource") else "")
        key = f"{labels.get('verb', '?')}{' dry-run' if labels.get('dry_run') else ''} {what}"
        counts[key] = counts.get(key, 0) + v
    return counts


def requests_delta(before):
    """The requests since `before`, by verb and resource."""
    after = apiserver_by_resource()
    return {k: v - before.get(k, 0) for k, v in after.items()}


def operator_metric(name):
    for line in http(f"http://127.0.0.1:{OP_PORT}/metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def jetstream_api_total():
    """JetStream API requests the server has answered so far (all clients)."""
    return json.loads(http(f"{NATS_MON}/jsz"))["api"]["total"]


def steady(pid):
    c0, a0 = cpu_seconds(pid), apiserver_requests()
    j0 = jetstream_api_total()
    r0 = operator_metric("orderoperator_reconciles_total")
    time.sleep(STEADY)  # the measurement window itself, not a synchronisation
    c1, a1 = cpu_seconds(pid), apiserver_requests()
    j1 = jetstream_api_total()
    r1 = operator_metric("orderoperator_reconciles_total")
    conns = json.loads(http(f"{NATS_MON}/connz?limit=10000"))["connections"]
    per_min = 60.0 / STEADY
    return {
        "cpu_seconds": c1 - c0,
        "rss_mib": rss_mib(pid, "VmHWM"),
        "api_per_min": {k: (a1.get(k, 0) - a0.get(k, 0)) * per_min for k in sorted(a1) if a1.get(k, 0) - a0.get(k, 0) > 0},
        "jetstream_api_per_min": (j1 - j0) * per_min,
        "nats_connections": sum(1 for c in conns if c.get("name", "").startswith("order-operator")),
        "reconciles_per_min": (r1 - r0) * per_min,
    }


def change(ns, n):
    t0 = time.monotonic()
    sh("kubectl", "apply", "--server-side", "-f", "-", input=pipelines_yaml(ns, n, max_age="48h"))
    jsbench("-prefix", "P", "-n", str(n), "-max-age", "48h", "-timeout", f"{60 + 2 * n}s", "wait-max-age")
    return time.monotonic() - t0


def repair(n):
    removed = jsbench("-prefix", "P", "-n", str(n), "-every", "10", "rm")["count"]
    t0 = time.monotonic()
    jsbench("-prefix", "P", "-n", str(n), "-timeout", f"{60 + 2 * n}s", "wait-exist")
    return removed, time.monotonic() - t0


def delete(ns, n, wait_namespace=False):
    t0 = time.monotonic()
    sh("kubectl", "delete", "orderpipelines", "--all", "-n", ns, "--wait=false")
    jsbench("-prefix", "P", "-n", str(n), "-timeout", f"{60 + 2 * n}s", "wait-gone")
    took = time.monotonic() - t0
    if wait_namespace:
        # Between create runs: its Pods and ReplicaSets gone before the next baseline.
        sh("kubectl", "delete", "namespace", ns, f"--timeout={120 + n}s")
    else:
        sh("kubectl", "delete", "namespace", ns, "--wait=false")
    return took


results = {}


def main():
    pid = operator_pid()
    rendered = rendered_deployment()
    rows = []
    for n in NS_LIST:
        print(f"\n== N = {n}", flush=True)
        creates = []
        for run in range(CREATE_RUNS):
            if run:
                # The previous run's pipelines go first (their streams' names are reused).
                delete(ns, n, wait_namespace=True)
            b = baseline(n, run, rendered)
            ns, o = operator_create(n, run)
            print_create(n, run, b, o)
            creates.append((o, b))
        o, b = summarise_creates(n, creates)
        s = steady(pid)
        api = ", ".join(f"{k} {v:.0f}" for k, v in s["api_per_min"].items())
        print(f"steady {STEADY} s: operator CPU {s['cpu_seconds']:.1f} s, peak RSS {s['rss_mib']:.0f} MiB (target < 100), "
              f"reconciles/min {s['reconciles_per_min']:.0f}, JetStream API requests/min {s['jetstream_api_per_min']:.0f}, "
              f"NATS connections held {s['nats_connections']} (target: 1 server x 1 credentials = 1)")
        print(f"steady: API server requests/min by verb (all clients): {api}")
        ch = change(ns, n)
        print(f"change: maxAge on all {n} until every stream shows it {ch:.1f} s")
        removed, rp = repair(n)
        print(f"repair: {removed} streams removed with nats stream rm, all back in {rp:.1f} s (target <= one resync)")
        d = delete(ns, n)
        print(f"delete: all {n} (deletionPolicy Delete) until every stream is gone {d:.1f} s")
        rows.append({"n": n, "operator": o, "baseline": b, "steady": s, "change": ch,
                     "repair": rp, "removed": removed, "delete": d})
    if os.environ.get("BENCH_WRITE_DOCS") == "1":
        write_docs(rows)


def create_ratios(o, b):
    """The operator's create against its baseline: (time to all Ready, kube-apiserver CPU)."""
    api_cpu = o["cpu"].get("kube-apiserver", 0) / max(b["cpu"].get("kube-apiserver", 0), 1e-9)
    return o["all_ready"] / b["all_ready"], api_cpu


def spread(t):
    """A (median, lowest, highest) triple as "median (lowest-highest)"."""
    return f"{t[0]:.2f} ({t[1]:.2f}-{t[2]:.2f})"


def print_create(n, run, b, o):
    ratio, api_cpu = create_ratios(o, b)
    print(f"create {run + 1}/{CREATE_RUNS}: all StreamReady+ConsumerReady with their Deployment {o['topology']:.1f} s (target <= 60 s); "
          f"{o['reconciles']:.0f} reconciles ({o['reconciles'] / n:.1f} per pipeline), "
          f"JetStream API requests per new pipeline {o['jetstream_api'] / n:.1f} (baseline {b['jetstream_api'] / n:.1f})")
    print(f"create {run + 1}/{CREATE_RUNS}: all Ready {o['all_ready']:.1f} s (p50 {o['p50']:.1f} s, p99 {o['p99']:.1f} s); "
          f"baseline {b['all_ready']:.1f} s (JetStream objects {b['jetstream']:.1f} s, Deployments available {b['deployments']:.1f} s); "
          f"ratio {ratio:.2f}; kube-apiserver CPU ratio {api_cpu:.2f}")
    print(f"create {run + 1}/{CREATE_RUNS}: CPU seconds by process until all Ready: {largest_first(o['cpu'])}; baseline: {largest_first(b['cpu'])}")
    print(f"create {run + 1}/{CREATE_RUNS}: status writes per new pipeline {o['status_writes'] / n:.2f}, the operator's Events per new pipeline "
          f"{o['operator_events'] / n:.2f}; Events in the pipelines' namespace by reason: {o['events']}")
    print(f"create {run + 1}/{CREATE_RUNS}: API requests until all Ready (most frequent, all clients): {largest_first(o['requests'], '{:.0f}', 1, 8)}; "
          f"baseline: {largest_first(b['requests'], '{:.0f}', 1, 8)}", flush=True)


def summarise_creates(n, creates):
    """The median run (by ratio) and the spread of the ratios over the runs."""
    ranked = sorted(creates, key=lambda c: create_ratios(*c)[0])
    o, b = ranked[len(ranked) // 2]
    ratios, api = zip(*(create_ratios(*c) for c in creates))
    o["ratio"] = (statistics.median(ratios), min(ratios), max(ratios))
    o["api_cpu_ratio"] = (statistics.median(api), min(api), max(api))
    writes = statistics.median(c[0]["status_writes"] / n for c in creates)
    events = statistics.median(c[0]["operator_events"] / n for c in creates)
    o["writes_per_pipeline"], o["events_per_pipeline"] = writes, events
    print(f"create, median of {len(creates)} runs: ratio to the baseline {spread(o['ratio'])} (target <= 1.3 at N = 500); "
          f"kube-apiserver CPU ratio {spread(o['api_cpu_ratio'])} (target <= 1.5); "
          f"status writes per new pipeline {writes:.2f} (target 1); the operator's Events per new pipeline {events:.2f}", flush=True)
    return o, b


def svg(rows):
    w, h, pad = 640, 300, 50
    xs = [r["n"] for r in rows]
    ys1 = [r["operator"]["all_ready"] for r in rows] + [r["baseline"]["all_ready"] for r in rows]
    ymax = max(ys1) * 1.15 or 1
    rmax = max(r["steady"]["rss_mib"] for r in rows) * 1.15 or 1
    def x(n):
        return pad + (w - 2 * pad) * (n / max(xs))
    def y(v, m):
        return h - pad - (h - 2 * pad) * (v / m)
    def line(vals, m, color, label, k):
        pts = " ".join(f"{x(n):.1f},{y(v, m):.1f}" for n, v in zip(xs, vals))
        return (f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>'
                f'<text x="{w - pad + 5}" y="{pad + 16 * k}" font-size="11" fill="{color}">{label}</text>')
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w + 170}" height="{h}" font-family="sans-serif">',
             f'<text x="{pad}" y="20" font-size="13">time to all Ready (s, left) and operator peak RSS (MiB, right) against N</text>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>']
    for n in xs:
        parts.append(f'<text x="{x(n) - 10:.1f}" y="{h - pad + 15}" font-size="11">{n}</text>')
    parts.append(f'<text x="5" y="{pad + 5}" font-size="11">{ymax:.0f} s</text>')
    parts.append(f'<text x="{w - pad - 10}" y="{pad - 5}" font-size="11">{rmax:.0f} MiB</text>')
    parts.append(line([r["operator"]["all_ready"] for r in rows], ymax, "#1f77b4", "operator: all Ready", 0))
    parts.append(line([r["baseline"]["all_ready"] for r in rows], ymax, "#ff7f0e", "baseline: all Ready", 1))
    parts.append(line([r["steady"]["rss_mib"] for r in rows], rmax, "#2ca02c", "operator: peak RSS", 2))
    parts.append("</svg>")
    return "\n".join(parts)


def write_docs(rows):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from generated_block import replace_block
    docs = os.path.join(ROOT, "docs", "src")
    open(os.path.join(docs, "bench-operator.svg"), "w").write(svg(rows))
    lines = [f"Run of {time.strftime('%Y-%m-%d')}, figures from one run of the script (steady window {STEADY} s):", "",
             f"the create phase is run {CREATE_RUNS} times per N; its columns are the median run's, the ratios the medians (lowest-highest run).", "",
             "| N | all StreamReady+ConsumerReady+Deployment | all Ready (p50 / p99) | baseline all Ready | ratio | kube-apiserver CPU ratio | status writes per new pipeline | operator Events per new pipeline | peak RSS | CPU in steady state | reconciles/min | status writes/min | Deployment writes/min | NATS connections | maxAge change | 10 % streams removed, back in | delete all |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        o, b, s = r["operator"], r["baseline"], r["steady"]
        lines.append(
            f"| {r['n']} | {o['topology']:.1f} s | {o['all_ready']:.1f} s ({o['p50']:.1f} / {o['p99']:.1f}) | "
            f"{b['all_ready']:.1f} s | {spread(o['ratio'])} | {spread(o['api_cpu_ratio'])} | "
            f"{o['writes_per_pipeline']:.2f} | {o['events_per_pipeline']:.2f} | {s['rss_mib']:.0f} MiB | "
            f"{s['cpu_seconds']:.1f} s | {s['reconciles_per_min']:.0f} | {s['api_per_min'].get('status-writes', 0):.0f} | "
            f"{s['api_per_min'].get('deployment-writes', 0):.0f} | "
            f"{s['nats_connections']} | {r['change']:.1f} s | {r['repair']:.1f} s | {r['delete']:.1f} s |")
    lines += ["", "![time to all Ready and RSS against N](bench-operator.svg)"]
    replace_block(os.path.join(docs, "benchmarks.md"), "bench-operator", "\n".join(lines))


if __name__ == "__main__":
    main()
