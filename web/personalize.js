// ComfyUI-Personalize web extension: a live loss chart on the trainer nodes, and the DINOScore metrics on the
// metric node. Loaded by ComfyUI from /extensions/<pack folder>/personalize.js; uses only the public extension API
// (app.registerExtension, api.addEventListener, node.addDOMWidget).
//
// Events (sent by nodes/bridge.py to the client that queued the prompt):
//   personalize.loss     {node: "<node id>", step, total, loss, lr}
//   personalize.validation {node: "<node id>", step, total, dino?, clip_i?, clip_t?, pres?, div?, seconds,
//                           best_step}                                 (a trainer's validation, every N steps)
//   personalize.metrics  {node: "<node id>", metrics: {dino, pairs, ...}}        (optional)
// and ComfyUI's own: execution_start, executed {node, display_node, output}, execution_error, execution_interrupted.
//
// Nothing here is needed by the Python side: with no browser attached (API-only use) the events are simply not
// received, and the widgets are never serialized into the workflow or the prompt.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "personalize.training";
const LOSS_EVENT = "personalize.loss";
const VALIDATION_EVENT = "personalize.validation";
// The metric drawn beside the loss: the first of these a validation row has.
const CURVE_METRICS = [["dino", "DINO"], ["clip_t", "CLIP-T"], ["clip_i", "CLIP-I"]];
const METRICS_EVENT = "personalize.metrics";
const TRAINERS = new Set(["TrainLoRA", "TrainDreamBooth", "TrainEmbedding"]);
const METRIC_NODES = new Set(["DINOScore"]);
const CHART_WIDGET = "personalize_loss_chart";
const METRICS_WIDGET = "personalize_metrics";
const CHART_HEIGHT = 210; // px of the chart widget (node units at zoom 1)
const METRICS_HEIGHT = 96;
const MIN_NODE_WIDTH = 340;
const MAX_POINTS = 20000; // per node; older points are thinned 2:1 beyond this

// --- state, kept per node id (the id the server reports) ------------------------------------------------------

const runs = new Map(); // node id string -> run state
const metricsByNode = new Map(); // node id string -> {metrics, text}
const widgetsByNode = new Map(); // node id string -> Set of redraw functions

function newRun() {
    return { steps: [], losses: [], smooth: [], ema: 0, emaWeight: 0, beta: 0.9, total: 0, lr: null,
             status: "idle", stale: false, report: "", every: 1, skip: 0, validation: [], bestStep: null };
}

function runFor(id) {
    let run = runs.get(id);
    if (!run) {
        run = newRun();
        runs.set(id, run);
    }
    return run;
}

function smoothingFor(total) {
    // A debiased EMA (as TensorBoard draws it) over roughly 2% of the run: 0.8 for short runs, 0.98 for long ones.
    const n = Number.isFinite(total) && total > 0 ? total : 100;
    return Math.min(0.98, Math.max(0.8, 1 - 50 / n));
}

function addLoss(id, detail) {
    const step = Number(detail.step);
    // JSON has no NaN/Infinity: a non-finite loss arrives as null (or a string); count it, don't draw it.
    const loss = typeof detail.loss === "number" ? detail.loss : typeof detail.loss === "string" ? Number(detail.loss) : NaN;
    if (!Number.isFinite(step)) return;
    let run = runFor(id);
    if (run.stale || step <= 1 || step <= (run.lastStep ?? 0)) {
        // A new run: the first event after execution_start, step 1, or the step count going back. (The report
        // text belongs to the finished run; the new one gets its own from its `executed` message.)
        run = newRun();
        runs.set(id, run);
    }
    run.total = Number(detail.total) || run.total;
    run.beta = smoothingFor(run.total);
    if (detail.lr !== undefined && detail.lr !== null) run.lr = Number(detail.lr);
    run.status = "running";
    if (!Number.isFinite(loss)) {
        run.lastStep = step;
        run.nonFinite = (run.nonFinite || 0) + 1;
        return run;
    }
    run.lastStep = step;
    run.ema = run.beta * run.ema + (1 - run.beta) * loss;
    run.emaWeight = run.beta * run.emaWeight + (1 - run.beta);
    // Thin the stored points once there are too many: keep every `every`-th one, plus always the latest value.
    if (run.skip > 0) {
        run.skip -= 1;
        run.pending = [step, loss, run.ema / run.emaWeight];
        return run;
    }
    run.steps.push(step);
    run.losses.push(loss);
    run.smooth.push(run.ema / run.emaWeight);
    run.pending = null;
    run.skip = run.every - 1;
    if (run.steps.length > MAX_POINTS) {
        for (const key of ["steps", "losses", "smooth"]) run[key] = run[key].filter((_, i) => i % 2 === 0);
        run.every *= 2;
    }
    return run;
}

function setLosses(id, losses) {
    // A whole history at once (the node's `executed` output, when the server sends one): e.g. a reused run.
    runs.set(id, newRun());
    losses.forEach((loss, i) => addLoss(id, { step: i + 1, total: losses.length, loss }));
    runs.get(id).status = "done";
}

function addValidation(id, row) {
    // A validation row of the running trainer (its loss events came first, so its run exists and is current).
    const step = Number(row.step);
    if (!Number.isFinite(step)) return null;
    const run = runFor(id);
    run.validation = run.validation.filter((r) => r.step !== step).concat([{ ...row, step }]);
    run.validation.sort((a, b) => a.step - b.step);
    if (row.best_step !== undefined && row.best_step !== null) run.bestStep = Number(row.best_step);
    return run;
}

function curveMetric(run) {
    for (const [key, label] of CURVE_METRICS) {
        if (run.validation.some((r) => Number.isFinite(r[key]))) return [key, label];
    }
    return null;
}

function redraw(id) {
    for (const fn of widgetsByNode.get(String(id)) ?? []) fn();
}

function redrawAll() {
    for (const id of widgetsByNode.keys()) redraw(id);
}

// --- looking nodes up by the id the server reports ("12", or "3:12" inside a subgraph) -------------------------

function nodeForId(id) {
    if (app.isGraphReady === false) return null; // (app.rootGraph logs an error before the graph exists)
    const graph = app.rootGraph ?? app.graph;
    if (!graph || id === undefined || id === null) return null;
    const parts = String(id).split(":");
    let node = null;
    let current = graph;
    for (const part of parts) {
        node = current?.getNodeById?.(part) ?? current?.getNodeById?.(Number(part)) ?? null;
        if (!node) return null;
        current = node.subgraph;
    }
    return node;
}

function nodeIdOf(node) {
    return node?.id === undefined || node.id === null ? "" : String(node.id);
}

// --- drawing --------------------------------------------------------------------------------------------------

function cssVar(name, fallback) {
    const value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return value || fallback;
}

function fmt(value) {
    if (value === null || value === undefined || !Number.isFinite(value)) return "–";
    const a = Math.abs(value);
    if (a !== 0 && (a < 1e-3 || a >= 1e4)) return value.toExponential(2);
    return value.toFixed(a < 0.1 ? 4 : 3);
}

function axisLabel(value) {
    const a = Math.abs(value);
    if (a !== 0 && (a < 1e-3 || a >= 1e4)) return value.toExponential(1);
    return String(Number(value.toPrecision(3)));
}

function niceRange(lo, hi) {
    if (!Number.isFinite(lo) || !Number.isFinite(hi)) return [0, 1];
    if (hi - lo < 1e-12) {
        const pad = Math.abs(hi) * 0.05 || 0.05;
        return [lo - pad, hi + pad];
    }
    const pad = (hi - lo) * 0.06;
    return [lo - pad, hi + pad];
}

function drawChart(canvas, id) {
    const dpr = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.floor(canvas.clientWidth));
    const height = Math.max(1, Math.floor(canvas.clientHeight));
    if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
        canvas.width = Math.round(width * dpr);
        canvas.height = Math.round(height * dpr);
    }
    const ctx = canvas.getContext("2d");
    if (!ctx) return;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);

    const fg = cssVar("--input-text", "#ddd");
    const dim = cssVar("--descrip-text", "#999");
    const grid = cssVar("--border-color", "#4e4e4e");
    const bg = cssVar("--comfy-input-bg", "#222");
    const rawColor = "rgba(110, 160, 255, 0.55)";
    const smoothColor = "#ff9f43";

    ctx.fillStyle = bg;
    ctx.beginPath();
    if (ctx.roundRect) ctx.roundRect(0, 0, width, height, 6);
    else ctx.rect(0, 0, width, height);
    ctx.fill();

    const run = runs.get(id);
    ctx.font = "11px sans-serif";
    ctx.textBaseline = "middle";
    if (!run || (run.steps.length === 0 && !run.pending)) {
        ctx.fillStyle = dim;
        ctx.textAlign = "center";
        const message = run?.status === "running" ? "waiting for the first finite loss…" : "loss chart: appears here while the node trains";
        ctx.fillText(message, width / 2, height / 2);
        return;
    }

    const steps = run.pending ? run.steps.concat([run.pending[0]]) : run.steps;
    const losses = run.pending ? run.losses.concat([run.pending[1]]) : run.losses;
    const smooth = run.pending ? run.smooth.concat([run.pending[2]]) : run.smooth;
    const n = steps.length;
    const lastStep = run.lastStep ?? steps[n - 1];
    const lastLoss = losses[n - 1];
    const lastSmooth = smooth[n - 1];

    // Header: step count, last raw value and smoothed value; below it the learning rate and the status.
    const status = run.stale ? "previous run" : run.status;
    ctx.textAlign = "left";
    ctx.fillStyle = fg;
    ctx.fillText(`step ${lastStep}${run.total ? " / " + run.total : ""}   loss ${fmt(lastLoss)}   smoothed ${fmt(lastSmooth)}`,
                 8, 11);
    ctx.fillStyle = dim;
    ctx.fillText(run.lr !== null && Number.isFinite(run.lr) ? `lr ${fmt(run.lr)}` : "", 8, 26);
    ctx.textAlign = "right";
    ctx.fillStyle = status === "running" ? "#7bd88f" : status === "done" || status === "previous run" ? dim : "#ff6b6b";
    ctx.fillText(status + (run.nonFinite ? ` · ${run.nonFinite} non-finite` : ""), width - 8, 26);

    // Plot area.
    const left = 46, right = width - 10, top = 40, bottom = height - 18;
    if (right - left < 20 || bottom - top < 20) return;
    let lo = Infinity, hi = -Infinity;
    for (let i = 0; i < n; i++) {
        if (losses[i] < lo) lo = losses[i];
        if (losses[i] > hi) hi = losses[i];
    }
    [lo, hi] = niceRange(lo, hi);
    const xMax = Math.max(run.total || 0, lastStep, 2);
    const xOf = (s) => left + ((s - 1) / (xMax - 1)) * (right - left);
    const yOf = (v) => bottom - ((v - lo) / (hi - lo)) * (bottom - top);

    ctx.strokeStyle = grid;
    ctx.lineWidth = 1;
    ctx.fillStyle = dim;
    ctx.textAlign = "right";
    for (let k = 0; k <= 3; k++) {
        const v = lo + ((hi - lo) * k) / 3;
        const y = Math.round(yOf(v)) + 0.5;
        ctx.beginPath();
        ctx.moveTo(left, y);
        ctx.lineTo(right, y);
        ctx.stroke();
        ctx.fillText(axisLabel(v), left - 4, y);
    }
    ctx.textAlign = "left";
    ctx.fillText("1", left, bottom + 9);
    ctx.textAlign = "right";
    ctx.fillText(String(xMax), right, bottom + 9);
    ctx.textAlign = "center";
    ctx.fillText("step", (left + right) / 2, bottom + 9);

    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top - 1, right - left, bottom - top + 2);
    ctx.clip();
    // Raw loss: one vertical min-max stroke per pixel column when there are more points than pixels.
    ctx.strokeStyle = rawColor;
    ctx.lineWidth = 1;
    ctx.beginPath();
    if (n > (right - left)) {
        let col = -1, cMin = 0, cMax = 0;
        const flush = () => {
            if (col < 0) return;
            ctx.moveTo(col + 0.5, yOf(cMin));
            ctx.lineTo(col + 0.5, yOf(cMax) + 0.01);
        };
        for (let i = 0; i < n; i++) {
            const x = Math.floor(xOf(steps[i]));
            if (x !== col) {
                flush();
                col = x;
                cMin = cMax = losses[i];
            } else {
                cMin = Math.min(cMin, losses[i]);
                cMax = Math.max(cMax, losses[i]);
            }
        }
        flush();
    } else {
        for (let i = 0; i < n; i++) {
            const x = xOf(steps[i]), y = yOf(losses[i]);
            if (i === 0) ctx.moveTo(x, y);
            else ctx.lineTo(x, y);
        }
    }
    ctx.stroke();
    if (n === 1) {
        ctx.fillStyle = rawColor;
        ctx.fillRect(xOf(steps[0]) - 1.5, yOf(losses[0]) - 1.5, 3, 3);
    }
    // Smoothed loss.
    ctx.strokeStyle = smoothColor;
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    ctx.beginPath();
    for (let i = 0; i < n; i++) {
        const x = xOf(steps[i]), y = yOf(smooth[i]);
        if (i === 0) ctx.moveTo(x, y);
        else ctx.lineTo(x, y);
    }
    ctx.stroke();
    drawValidation(ctx, run, xOf, left, right, top, bottom, dim);
    ctx.restore();

    // Legend.
    ctx.font = "10px sans-serif";
    ctx.textAlign = "right";
    ctx.textBaseline = "top";
    ctx.fillStyle = smoothColor;
    ctx.fillText("— smoothed", right - 4, top + 3);
    ctx.fillStyle = rawColor;
    ctx.fillText("— raw", right - 70, top + 3);
}

const VALIDATION_COLOR = "#5fd38d";
const BEST_COLOR = "#ffd166";

function drawValidation(ctx, run, xOf, left, right, top, bottom, dim) {
    // The validation metric on its own scale (labelled at the right edge), and the chosen step as a dashed line.
    const metric = curveMetric(run);
    if (metric) {
        const [key, label] = metric;
        const points = run.validation.filter((r) => Number.isFinite(r[key]));
        let [lo, hi] = niceRange(Math.min(...points.map((r) => r[key])), Math.max(...points.map((r) => r[key])));
        const yOf = (v) => bottom - ((v - lo) / (hi - lo)) * (bottom - top);
        ctx.strokeStyle = VALIDATION_COLOR;
        ctx.fillStyle = VALIDATION_COLOR;
        ctx.lineWidth = 2;
        ctx.beginPath();
        points.forEach((r, i) => (i === 0 ? ctx.moveTo(xOf(r.step), yOf(r[key])) : ctx.lineTo(xOf(r.step), yOf(r[key]))));
        ctx.stroke();
        for (const r of points) ctx.fillRect(xOf(r.step) - 2.5, yOf(r[key]) - 2.5, 5, 5);
        ctx.font = "10px sans-serif";
        ctx.textAlign = "right";
        ctx.textBaseline = "middle";
        ctx.fillText(axisLabel(hi), right - 2, top + 18);
        ctx.fillText(axisLabel(lo), right - 2, bottom - 6);
        ctx.textBaseline = "top";
        ctx.fillText(`— ${label}`, right - 130, top + 3);
    }
    if (run.bestStep !== null && Number.isFinite(run.bestStep)) {
        const x = Math.round(xOf(run.bestStep)) + 0.5;
        ctx.strokeStyle = BEST_COLOR;
        ctx.lineWidth = 1;
        ctx.setLineDash([4, 3]);
        ctx.beginPath();
        ctx.moveTo(x, top);
        ctx.lineTo(x, bottom);
        ctx.stroke();
        ctx.setLineDash([]);
        ctx.fillStyle = BEST_COLOR;
        ctx.font = "10px sans-serif";
        ctx.textAlign = x > (left + right) / 2 ? "right" : "left";
        ctx.textBaseline = "bottom";
        ctx.fillText(`best ${run.bestStep}`, x + (ctx.textAlign === "left" ? 3 : -3), bottom - 2);
    }
    ctx.fillStyle = dim;
}

// --- widgets ----------------------------------------------------------------------------------------------------

function watch(node, fn) {
    // Redraw functions are looked up by the node's current id at event time (nodeCreated runs before the node has
    // an id; loading a workflow assigns it later).
    let registeredId = null;
    const update = () => {
        const id = nodeIdOf(node);
        if (id === registeredId) return;
        if (registeredId !== null) widgetsByNode.get(registeredId)?.delete(fn);
        registeredId = id;
        if (!widgetsByNode.has(id)) widgetsByNode.set(id, new Set());
        widgetsByNode.get(id).add(fn);
    };
    const stop = () => {
        if (registeredId !== null) widgetsByNode.get(registeredId)?.delete(fn);
        registeredId = null;
    };
    return { update, stop };
}

// Draw a node's widget now and again whenever the node is added to a graph or loaded from a saved one.
function keepDrawn(node, registration, draw) {
    chain(node, "onAdded", () => { registration.update(); draw(); });
    chain(node, "onConfigure", () => { registration.update(); fitNode(node, 0); draw(); });
    registration.update();
    fitNode(node, 0);
    draw();
}

function fitNode(node, minHeight) {
    try {
        const size = node.computeSize?.() ?? node.size;
        const w = Math.max(node.size?.[0] ?? 0, size[0], MIN_NODE_WIDTH);
        const h = Math.max(node.size?.[1] ?? 0, size[1], minHeight ?? 0);
        if (w !== node.size?.[0] || h !== node.size?.[1]) node.setSize([w, h]);
    } catch (error) {
        console.warn(`[${EXTENSION}] could not resize node`, error);
    }
}

function chain(object, method, after) {
    const original = object[method];
    object[method] = function (...args) {
        const result = typeof original === "function" ? original.apply(this, args) : undefined;
        try {
            after.apply(this, args);
        } catch (error) {
            console.warn(`[${EXTENSION}] ${method} hook failed`, error);
        }
        return result;
    };
}

function addChartWidget(node) {
    if (node.widgets?.some((w) => w.name === CHART_WIDGET)) return;
    const container = document.createElement("div");
    container.className = "personalize-loss-chart";
    Object.assign(container.style, { display: "flex", flexDirection: "column", gap: "2px", width: "100%",
                                     height: "100%", boxSizing: "border-box", overflow: "hidden" });
    const canvas = document.createElement("canvas");
    Object.assign(canvas.style, { flex: "1 1 auto", width: "100%", minHeight: "60px", display: "block" });
    const report = document.createElement("div");
    Object.assign(report.style, { flex: "0 0 auto", font: "11px sans-serif", color: "var(--descrip-text, #999)",
                                  whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis",
                                  minHeight: "14px", padding: "0 4px" });
    container.append(canvas, report);

    let frame = 0;
    const draw = () => {
        if (frame) return;
        frame = requestAnimationFrame(() => {
            frame = 0;
            try {
                const id = nodeIdOf(node);
                drawChart(canvas, id);
                const text = runs.get(id)?.report ?? "";
                if (report.textContent !== text) {
                    report.textContent = text;
                    report.title = text;
                }
            } catch (error) {
                console.warn(`[${EXTENSION}] drawing the loss chart failed`, error);
            }
        });
    };
    const registration = watch(node, draw);
    const widget = node.addDOMWidget(CHART_WIDGET, "personalize_chart", container, {
        serialize: false,
        hideOnZoom: true,
        getMinHeight: () => CHART_HEIGHT,
        getMaxHeight: () => CHART_HEIGHT * 3,
        getValue: () => "",
        setValue: () => {},
    });
    widget.serialize = false;
    const observer = typeof ResizeObserver === "function" ? new ResizeObserver(draw) : null;
    observer?.observe(canvas);
    chain(widget, "onRemove", () => {
        observer?.disconnect();
        registration.stop();
    });
    keepDrawn(node, registration, draw);
    return widget;
}

function metricValue(value) {
    if (typeof value === "number") return Number.isInteger(value) ? String(value) : fmt(value);
    if (value && typeof value === "object") return JSON.stringify(value);
    return String(value);
}

function metricsText(entry) {
    // Structured metrics (the personalize.metrics event, or a `metrics` list in the node's ui output) as a small
    // table, DINO first; then the node's own report text (its `executed` ui text), when there is one.
    if (!entry) return null;
    const parts = [];
    if (entry.metrics && typeof entry.metrics === "object") {
        const m = entry.metrics;
        const lines = [];
        if (m.dino !== undefined) lines.push(`DINO ${metricValue(m.dino)}`);
        for (const [key, value] of Object.entries(m)) {
            if (key !== "dino") lines.push(`${key} ${metricValue(value)}`);
        }
        parts.push(lines.join("\n"));
    }
    if (entry.text && !parts.includes(entry.text)) parts.push(entry.text);
    return parts.length ? parts.join("\n\n") : null;
}

function addMetricsWidget(node) {
    if (node.widgets?.some((w) => w.name === METRICS_WIDGET)) return;
    const box = document.createElement("div");
    box.className = "personalize-metrics";
    Object.assign(box.style, { width: "100%", height: "100%", boxSizing: "border-box", padding: "6px 8px",
                               overflow: "auto", whiteSpace: "pre-wrap", font: "12px monospace",
                               color: "var(--input-text, #ddd)", background: "var(--comfy-input-bg, #222)",
                               borderRadius: "6px" });
    const draw = () => {
        try {
            const text = metricsText(metricsByNode.get(nodeIdOf(node)));
            box.textContent = text ?? "metrics: appear here after the node runs";
            box.style.color = text ? "var(--input-text, #ddd)" : "var(--descrip-text, #999)";
        } catch (error) {
            console.warn(`[${EXTENSION}] showing metrics failed`, error);
        }
    };
    const registration = watch(node, draw);
    const widget = node.addDOMWidget(METRICS_WIDGET, "personalize_metrics", box, {
        serialize: false,
        hideOnZoom: true,
        getMinHeight: () => METRICS_HEIGHT,
        getValue: () => "",
        setValue: () => {},
    });
    widget.serialize = false;
    chain(widget, "onRemove", () => registration.stop());
    keepDrawn(node, registration, draw);
    return widget;
}

const packModules = new Set(); // python_module of this pack's node definitions, e.g. "custom_nodes.ComfyUI-Personalize"

function isPackTrainer(node) {
    const type = node?.comfyClass ?? node?.type;
    if (TRAINERS.has(type)) return true;
    const data = node?.constructor?.nodeData;
    return !!data && packModules.has(data.python_module) && String(data.category ?? "").startsWith("personalize/train");
}

function ensureChart(id) {
    // A loss event for a node without a chart (a trainer of this pack that this file doesn't list yet): add one.
    // Never on other nodes: an id from another workflow (or a broadcast) may name any node in this graph.
    const node = nodeForId(id);
    if (node && isPackTrainer(node) && !node.widgets?.some((w) => w.name === CHART_WIDGET) &&
            typeof node.addDOMWidget === "function") {
        addChartWidget(node);
        node.setDirtyCanvas?.(true, true);
    }
}

// --- event handlers ---------------------------------------------------------------------------------------------

function safely(name, handler) {
    return (event) => {
        try {
            handler(event?.detail ?? {});
        } catch (error) {
            console.warn(`[${EXTENSION}] ${name} handler failed`, error);
        }
    };
}

function onLoss(detail) {
    if (detail.node === undefined || detail.node === null) return;
    const id = String(detail.node);
    const run = addLoss(id, detail);
    if (!run) return;
    if (!widgetsByNode.get(id)?.size) ensureChart(id);
    redraw(id);
}

function onValidation(detail) {
    if (detail.node === undefined || detail.node === null) return;
    const id = String(detail.node);
    if (!addValidation(id, detail)) return;
    if (!widgetsByNode.get(id)?.size) ensureChart(id);
    redraw(id);
}

function onMetrics(detail) {
    if (detail.node === undefined || detail.node === null) return;
    const id = String(detail.node);
    const entry = metricsByNode.get(id) ?? {};
    entry.metrics = detail.metrics ?? null;
    metricsByNode.set(id, entry);
    redraw(id);
}

function outputText(output) {
    const text = output?.text;
    if (Array.isArray(text)) return text.filter((t) => typeof t === "string").join("\n");
    return typeof text === "string" ? text : "";
}

function onExecuted(detail) {
    const id = String(detail.display_node ?? detail.node ?? "");
    if (!id) return;
    const output = detail.output ?? {};
    const node = nodeForId(id);
    const type = node?.comfyClass ?? node?.type;
    const text = outputText(output);
    if (runs.has(id) || isPackTrainer(node)) {
        // The whole history, when the node's ui output carries it (e.g. a reused run that sent no events).
        const history = output.personalize_loss;
        const run = runFor(id);
        if (Array.isArray(history) && history.length && (run.stale || run.steps.length === 0)) setLosses(id, history.map(Number));
        const current = runFor(id);
        const table = output.personalize_validation;
        if (Array.isArray(table) && table.length) {
            current.validation = [];
            table.forEach((row) => addValidation(id, row));
        }
        const best = Array.isArray(output.personalize_best_step) ? output.personalize_best_step[0] : null;
        if (best !== undefined && best !== null) current.bestStep = Number(best);
        current.report = text;
        if (current.status === "running" || current.stale) current.status = "done";
        current.stale = false;
    }
    if (METRIC_NODES.has(type) || metricsByNode.has(id)) {
        const entry = metricsByNode.get(id) ?? {};
        entry.text = text;
        const structured = Array.isArray(output.metrics) ? output.metrics[0] : null;
        if (structured && typeof structured === "object") entry.metrics = structured;
        metricsByNode.set(id, entry);
    }
    redraw(id);
}

function onExecutionStart() {
    // A new prompt: every chart now shows its previous run, until that node's first loss event resets it.
    for (const run of runs.values()) run.stale = true;
    redrawAll();
}

function onStopped(status) {
    return (detail) => {
        const id = detail.node_id === undefined || detail.node_id === null ? null : String(detail.node_id);
        for (const [runId, run] of runs) {
            if (run.status === "running" && (id === null || id === runId)) {
                run.status = status;
                redraw(runId);
            }
        }
    };
}

app.registerExtension({
    name: EXTENSION,

    setup() {
        // Registered here, in setup(), so the frontend knows these message types before the first one arrives
        // (an unregistered custom type is logged as "Unhandled message").
        api.addEventListener(LOSS_EVENT, safely(LOSS_EVENT, onLoss));
        api.addEventListener(METRICS_EVENT, safely(METRICS_EVENT, onMetrics));
        api.addEventListener(VALIDATION_EVENT, safely(VALIDATION_EVENT, onValidation));
        api.addEventListener("executed", safely("executed", onExecuted));
        api.addEventListener("execution_start", safely("execution_start", onExecutionStart));
        api.addEventListener("execution_error", safely("execution_error", onStopped("error")));
        api.addEventListener("execution_interrupted", safely("execution_interrupted", onStopped("interrupted")));
    },

    beforeRegisterNodeDef(nodeType, nodeData) {
        if (TRAINERS.has(nodeData?.name) || METRIC_NODES.has(nodeData?.name)) packModules.add(nodeData.python_module);
    },

    nodeCreated(node) {
        const type = node?.comfyClass ?? node?.type;
        if (typeof node?.addDOMWidget !== "function") return;
        if (TRAINERS.has(type)) addChartWidget(node);
        else if (METRIC_NODES.has(type)) addMetricsWidget(node);
    },
});

// For tests and debugging only (not an API): the state the widgets draw.
window.personalizeExtension = Object.freeze({ name: EXTENSION, runs, metricsByNode, LOSS_EVENT, METRICS_EVENT,
                                             VALIDATION_EVENT });
