"""The playground page served at /: prefix and suffix boxes, a few parameters, the middle streamed in.

Plain HTML and JavaScript in a string (so it ships with the package without package data or a build step). It
calls /v1/completions like any client: with a suffix it is an infill, without one a completion.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>codegen2 playground</title>
<style>
 body { font: 14px system-ui, sans-serif; max-width: 60rem; margin: 1rem auto; padding: 0 1rem; }
 textarea, pre { width: 100%; box-sizing: border-box; font: 13px ui-monospace, monospace; }
 pre { border: 1px solid #ccc; padding: .5rem; min-height: 6rem; white-space: pre-wrap; }
 .ctx { color: #888; } #middle { background: #e6f4ea; } label { margin-right: 1rem; }
 input[type=number] { width: 5rem; }
</style></head><body>
<h1>codegen2 playground</h1>
<p>Code before the hole (the prompt):</p><textarea id="prefix" rows="8">def fibonacci(n):
    </textarea>
<p>Code after the hole (leave empty for a plain completion):</p><textarea id="suffix" rows="4"></textarea>
<p><label>max tokens <input id="max_tokens" type="number" value="64" min="1"></label>
<label>temperature <input id="temperature" type="number" value="0.2" min="0" step="0.1"></label>
<label>top p <input id="top_p" type="number" value="0.95" min="0.01" max="1" step="0.05"></label>
<label>stop <input id="stop" size="6" placeholder="\\n"></label>
<label>API key <input id="api_key" type="password" size="12"></label></p>
<p><button id="run">Generate</button> <button id="cancel" disabled>Stop</button> <span id="status"></span></p>
<pre id="output"><span class="ctx" id="before"></span><span id="middle"></span><span class="ctx" id="after"></span>
</pre>
<script>
const $ = (id) => document.getElementById(id);
let controller = null;
$("cancel").onclick = () => controller && controller.abort();
$("run").onclick = async () => {
  const prefix = $("prefix").value, suffix = $("suffix").value, stop = $("stop").value.replaceAll("\\\\n", "\\n");
  const body = {prompt: prefix, max_tokens: +$("max_tokens").value, temperature: +$("temperature").value,
                top_p: +$("top_p").value, stream: true};
  if (suffix) body.suffix = suffix;
  if (stop) body.stop = [stop];
  const headers = {"Content-Type": "application/json"};
  if ($("api_key").value) headers.Authorization = "Bearer " + $("api_key").value;
  $("before").textContent = prefix; $("after").textContent = suffix; $("middle").textContent = "";
  $("status").textContent = "generating..."; $("status").dataset.done = "";
  $("run").disabled = true; $("cancel").disabled = false; controller = new AbortController();
  let status = "done";
  try {
    const response = await fetch("/v1/completions", {method: "POST", headers, body: JSON.stringify(body),
                                                     signal: controller.signal});
    if (!response.ok) throw new Error((await response.json()).error.message);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split("\\n\\n"); buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices) {
          $("middle").textContent += choice.text;
          if (choice.finish_reason) status = "done (" + choice.finish_reason + ")";
        }
      }
    }
  } catch (e) { status = e.name === "AbortError" ? "stopped" : "error: " + e.message; }
  $("status").textContent = status; $("status").dataset.done = "1";
  $("run").disabled = false; $("cancel").disabled = true;
};
</script></body></html>
"""
