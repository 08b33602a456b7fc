// The digit recognizer page: a drawing pad (mouse, pen and touch through Pointer Events) and an
// image upload, both sent to POST /predict as a base64 PNG/JPEG. While the person draws, the pad is
// also streamed over the /ws/predict WebSocket for live predictions with their occlusion heat-map.
// After each /predict answer, "Wrong? It was a ..." sends the true digit to POST /feedback under that
// answer's request id (live answers have none: the feedback is for what was submitted).
// No libraries, no network but ours.
"use strict";

(function () {
  const pad = document.getElementById("pad");
  const ctx = pad.getContext("2d");
  const els = {
    status: document.getElementById("model-status"),
    result: document.getElementById("result"),
    placeholder: document.getElementById("placeholder"),
    error: document.getElementById("error"),
    digit: document.getElementById("digit"),
    confidence: document.getElementById("confidence"),
    bars: document.getElementById("bars"),
    model: document.getElementById("model"),
    latency: document.getElementById("latency"),
    roundtrip: document.getElementById("roundtrip"),
    requestId: document.getElementById("request-id"),
    inverted: document.getElementById("inverted-note"),
    upload: document.getElementById("upload"),
    source: document.getElementById("source"),
    explanation: document.getElementById("explanation"),
    heatmap: document.getElementById("heatmap"),
    liveStatus: document.getElementById("live-status"),
    feedback: document.getElementById("feedback"),
    feedbackStatus: document.getElementById("feedback-status"),
    feedbackButtons: Array.from(document.querySelectorAll("#feedback button[data-digit]")),
  };
  const heat = els.heatmap.getContext("2d");

  // Black ink on white, like paper: the server detects dark-on-light input and inverts it.
  const INK = "#000000";
  const PAPER = "#ffffff";
  let drawing = false;
  let dirty = false;
  let last = null;
  let inFlight = 0;

  // Live frames: at most one per LIVE_INTERVAL_MS while drawing; the server answers the newest.
  const LIVE_INTERVAL_MS = 100;
  let socket = null;
  let reconnectDelay = 500;
  let seq = 0; // id of the last frame sent
  let ignoreBelow = 1; // answers to older frames describe a drawing that is gone
  let submitted = 0; // the frame sent with the last submission: only its heat-map is wanted
  let liveTimer = null;
  let lastLiveAt = -Infinity;
  const sentAt = new Map();

  function clearPad() {
    ctx.fillStyle = PAPER;
    ctx.fillRect(0, 0, pad.width, pad.height);
    dirty = false;
  }

  function point(event) {
    const rect = pad.getBoundingClientRect();
    return {
      x: ((event.clientX - rect.left) * pad.width) / rect.width,
      y: ((event.clientY - rect.top) * pad.height) / rect.height,
    };
  }

  function stroke(from, to) {
    ctx.strokeStyle = INK;
    ctx.fillStyle = INK;
    ctx.lineWidth = 18;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
  }

  pad.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    pad.setPointerCapture(event.pointerId);
    drawing = true;
    last = point(event);
    stroke(last, last);
    dirty = true;
    document.body.dataset.state = "drawing";
    scheduleLive();
  });
  pad.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    event.preventDefault();
    const next = point(event);
    stroke(last, next);
    last = next;
    scheduleLive();
  });
  function endStroke(event) {
    if (!drawing) return;
    drawing = false;
    clearTimeout(liveTimer);
    liveTimer = null;
    if (pad.hasPointerCapture(event.pointerId)) pad.releasePointerCapture(event.pointerId);
    predictPad();
  }
  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);

  document.getElementById("clear").addEventListener("click", () => {
    clearPad();
    ignoreBelow = seq + 1;
    els.explanation.hidden = true;
    showPlaceholder();
  });
  document.getElementById("predict").addEventListener("click", () => predictPad());

  els.upload.addEventListener("change", () => {
    const file = els.upload.files && els.upload.files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => {
      showUpload(reader.result);
      predict(reader.result);
    };
    reader.onerror = () => showError("Could not read the file.");
    reader.readAsDataURL(file);
    els.upload.value = "";
  });

  // Shows the uploaded picture on the pad, fitted, so the person sees what was sent.
  function showUpload(dataUrl) {
    const img = new Image();
    img.onload = () => {
      clearPad();
      const scale = Math.min(pad.width / img.width, pad.height / img.height);
      const w = img.width * scale;
      const h = img.height * scale;
      ctx.drawImage(img, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
      dirty = false;
    };
    img.src = dataUrl;
  }

  function predictPad() {
    if (!dirty) {
      showError("Draw a digit first.");
      return;
    }
    predict(pad.toDataURL("image/png"));
  }

  // --- live predictions over the WebSocket ------------------------------------------------------

  function connectLive() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}/ws/predict`);
    ws.onopen = () => {
      socket = ws;
      reconnectDelay = 500;
      els.liveStatus.textContent = "Live predictions: on";
    };
    ws.onmessage = (event) => onLiveMessage(JSON.parse(event.data));
    ws.onclose = () => {
      if (socket === ws) socket = null;
      els.liveStatus.textContent = "Live predictions: reconnecting\u2026";
      setTimeout(connectLive, reconnectDelay);
      reconnectDelay = Math.min(reconnectDelay * 2, 10000);
    };
  }

  function sendFrame(message) {
    if (!socket || socket.readyState !== WebSocket.OPEN) return false;
    message.id = ++seq;
    sentAt.set(message.id, performance.now());
    socket.send(JSON.stringify(message));
    return true;
  }

  // Throttled: a frame now if the last one left LIVE_INTERVAL_MS ago, else one when that time is up.
  function scheduleLive() {
    if (liveTimer !== null) return;
    const wait = Math.max(0, lastLiveAt + LIVE_INTERVAL_MS - performance.now());
    liveTimer = setTimeout(() => {
      liveTimer = null;
      if (!drawing) return;
      lastLiveAt = performance.now();
      sendFrame({ image: pad.toDataURL("image/png"), explain: true });
    }, wait);
  }

  function onLiveMessage(message) {
    const started = sentAt.get(message.id);
    sentAt.delete(message.id);
    if (message.id !== null && message.id < ignoreBelow) return;
    if (message.type === "error") {
      // A submission's own error is shown by its /predict answer.
      if (message.id !== submitted) els.liveStatus.textContent = `Live predictions: ${message.error}`;
      return;
    }
    els.liveStatus.textContent = "Live predictions: on";
    if (message.saliency) paintHeatmap(message);
    if (message.id === submitted) return; // the prediction itself came from /predict
    render(message);
    hideFeedback();
    els.source.hidden = false;
    els.latency.textContent = `${message.latency_ms.toFixed(2)} ms`;
    if (started !== undefined) els.roundtrip.textContent = `${(performance.now() - started).toFixed(1)} ms`;
    document.body.dataset.live = String(message.id);
  }

  // The heat-map of a submitted image: over the WebSocket if it is up, else from POST /explain.
  function explainSubmitted(dataUrl) {
    if (sendFrame({ image: dataUrl, explain: true })) {
      submitted = ignoreBelow = seq;
    } else {
      submitted = ignoreBelow = ++seq;
      explainOverHttp(dataUrl, seq);
    }
    document.body.dataset.submitted = String(submitted);
  }

  function explainOverHttp(dataUrl, ticket) {
    fetch("/explain", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ image: dataUrl }),
    })
      .then((response) => (response.ok ? response.json() : null))
      .then((body) => {
        if (body && ticket >= ignoreBelow) paintHeatmap({ ...body, id: ticket });
      })
      .catch(() => {});
  }

  // The 28x28 image the model saw in grey, and red-to-yellow where hiding the stroke cost the
  // answer most (the saliency, scaled to its own maximum: a confident model's drops are tiny).
  function paintHeatmap(answer) {
    const { input, saliency } = answer;
    let peak = 0;
    for (const row of saliency) for (const v of row) if (v > peak) peak = v;
    const image = heat.createImageData(28, 28);
    const px = image.data;
    for (let y = 0; y < 28; y++) {
      for (let x = 0; x < 28; x++) {
        const grey = 150 * input[y][x];
        const h = peak > 0 ? Math.max(0, saliency[y][x]) / peak : 0;
        const a = Math.min(1, 1.6 * h);
        const i = (y * 28 + x) * 4;
        px[i] = grey * (1 - a) + 255 * a;
        px[i + 1] = grey * (1 - a) + 255 * Math.max(0, 2 * h - 1) * a;
        px[i + 2] = grey * (1 - a);
        px[i + 3] = 255;
      }
    }
    heat.putImageData(image, 0, 0);
    els.heatmap.dataset.frame = String(answer.id);
    els.explanation.hidden = false;
  }

  async function predict(dataUrl) {
    const started = performance.now();
    const ticket = ++inFlight;
    els.error.hidden = true;
    explainSubmitted(dataUrl);
    try {
      const response = await fetch("/predict", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ image: dataUrl }),
      });
      const body = await response.json().catch(() => ({}));
      if (ticket !== inFlight) return; // a newer request superseded this one
      if (!response.ok) {
        showError(body.error || `The server answered ${response.status}.`);
        return;
      }
      showResult(body, performance.now() - started);
    } catch (err) {
      if (ticket === inFlight) showError(`The server could not be reached (${err.message}).`);
    }
  }

  function showResult(body, roundTripMs) {
    render(body);
    offerFeedback(body.request_id);
    els.source.hidden = true;
    els.latency.textContent = `${body.latency_ms.toFixed(2)} ms`;
    els.roundtrip.textContent = `${roundTripMs.toFixed(1)} ms`;
    els.requestId.textContent = body.request_id;
    document.body.dataset.state = "predicted";
  }

  // What a /predict answer and a live answer both show.
  function render(body) {
    els.placeholder.hidden = true;
    els.result.hidden = false;
    els.digit.textContent = String(body.digit);
    els.confidence.textContent = `${(body.confidence * 100).toFixed(1)}%`;
    els.model.textContent = `${body.model_name} v${body.model_version}`;
    els.inverted.hidden = !body.inverted;
    els.bars.replaceChildren(
      ...body.probabilities.map((p, digit) => {
        const li = document.createElement("li");
        li.dataset.digit = String(digit);
        if (digit === body.digit) li.className = "top";
        const label = document.createElement("span");
        label.className = "label";
        label.textContent = String(digit);
        const track = document.createElement("span");
        track.className = "track";
        const fill = document.createElement("span");
        fill.className = "fill";
        fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
        track.appendChild(fill);
        const value = document.createElement("span");
        value.className = "value";
        value.textContent = `${(p * 100).toFixed(1)}%`;
        li.append(label, track, value);
        return li;
      }),
    );
  }

  // --- feedback: the true digit of the last /predict answer ---------------------------------------

  let feedbackFor = null; // the request id the buttons label

  function offerFeedback(requestId) {
    feedbackFor = requestId || null;
    els.feedback.hidden = feedbackFor === null;
    els.feedbackStatus.textContent = "";
    for (const button of els.feedbackButtons) {
      button.disabled = false;
      button.classList.remove("chosen");
    }
    delete document.body.dataset.feedback;
  }

  function hideFeedback() {
    feedbackFor = null;
    els.feedback.hidden = true;
  }

  async function sendFeedback(label, button) {
    const requestId = feedbackFor;
    if (requestId === null) return;
    for (const b of els.feedbackButtons) b.disabled = true;
    els.feedbackStatus.textContent = "Sending\u2026";
    let outcome = "error";
    try {
      const response = await fetch("/feedback", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ request_id: requestId, label }),
      });
      const body = await response.json().catch(() => ({}));
      if (requestId !== feedbackFor) return; // a newer prediction replaced this one
      if (response.ok) {
        outcome = body.outcome;
        button.classList.add("chosen");
        els.feedbackStatus.textContent =
          outcome === "created" ? `Thank you: recorded as a ${label}.` : `Already recorded as a ${label}.`;
      } else {
        outcome = `http-${response.status}`;
        els.feedbackStatus.textContent = body.error || `The server answered ${response.status}.`;
        // A refusal that may pass later (rate limit, database down) leaves the buttons usable.
        if (response.status === 429 || response.status >= 500) for (const b of els.feedbackButtons) b.disabled = false;
      }
    } catch (err) {
      if (requestId !== feedbackFor) return;
      els.feedbackStatus.textContent = `The server could not be reached (${err.message}).`;
      for (const b of els.feedbackButtons) b.disabled = false;
    }
    document.body.dataset.feedback = outcome;
  }

  for (const button of els.feedbackButtons) {
    button.addEventListener("click", () => sendFeedback(Number(button.dataset.digit), button));
  }

  function showPlaceholder() {
    hideFeedback();
    els.result.hidden = true;
    els.error.hidden = true;
    els.placeholder.hidden = false;
    document.body.dataset.state = "idle";
  }

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = false;
    document.body.dataset.state = "error";
  }

  async function refreshStatus() {
    try {
      const response = await fetch("/health", { cache: "no-store" });
      const body = await response.json();
      const model = body.model || {};
      if (body.status === "ok") {
        els.status.textContent = `Serving ${model.name} version ${model.version}` + (model.alias ? ` (@${model.alias})` : "");
        els.status.className = "status ok";
        return;
      }
      els.status.textContent = `Model ${model.uri || ""} is loading\u2026`;
      els.status.className = "status bad";
    } catch (err) {
      els.status.textContent = "The server is not reachable.";
      els.status.className = "status bad";
    }
    setTimeout(refreshStatus, 3000);
  }

  clearPad();
  showPlaceholder();
  refreshStatus();
  connectLive();
})();
