// api: how the page talks to serve.py. Every request goes through withKey (the API key flow):
// api() for JSON answers, sse() for streamed ones, upload() for a file with its progress;
// download() saves text the page made as a file.
import {el} from './dom.js';

// send(headers) with the server's API key (serve.py --api_key): asked for when the server answers
// 401, then kept for this browser session (sessionStorage: gone when the tab closes) and sent as
// 'Authorization: Bearer <key>'
async function withKey(send) {
  for (;;) {
    const key = sessionStorage.getItem('nanolab_api_key');
    const r = await send(key ? {Authorization: `Bearer ${key}`} : {});
    if (r.status !== 401) return r;
    const typed = prompt('This server needs its API key (the --api_key it was started with):');
    if (!typed) return r;
    sessionStorage.setItem('nanolab_api_key', typed);
  }
}

// fetch, with the key
export const keyedFetch = (path, init) =>
  withKey(auth => fetch(path, {...init, headers: {...init.headers, ...auth}}));

// POST a file as the raw body -> {ok, status, json}, calling onProgress(bytes sent, total bytes) as
// it goes: XMLHttpRequest, since fetch cannot report an upload's progress
export function upload(path, file, onProgress) {
  return withKey(auth => new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', path);
    xhr.responseType = 'json';  // null when the answer is not JSON
    for (const [k, v] of Object.entries({'Content-Type': 'application/octet-stream', ...auth})) {
      xhr.setRequestHeader(k, v);
    }
    xhr.upload.onprogress = e => onProgress(e.loaded, e.total);
    xhr.onload = () => resolve({ok: xhr.status >= 200 && xhr.status < 300, status: xhr.status,
                                json: xhr.response});
    xhr.onerror = () =>
      reject(new Error('the upload was cut off (connection lost, or too slow); try again'));
    xhr.send(file);
  }));
}

// POST body (or GET when body is undefined) -> the parsed JSON; an API error becomes a thrown Error
export async function api(path, body, signal) {
  const init = body === undefined ? {signal, headers: {}} : {method: 'POST', signal,
    headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)};
  const r = await keyedFetch(path, init);
  const j = await r.json();
  if (!r.ok || j.error) throw new Error(j.error ? j.error.message : r.statusText);
  return j;
}

// POST with "stream": true -> yields each server-sent event's JSON until "data: [DONE]". fetch +
// ReadableStream rather than EventSource, which can only GET. Aborting `signal` closes the
// connection; serve.py notices the closed socket between tokens and frees the request's batch slot.
export async function* sse(path, body, signal) {
  const r = await keyedFetch(path, {method: 'POST', headers: {'Content-Type': 'application/json'},
                                    body: JSON.stringify(body), signal});
  if (!r.ok) throw new Error((await r.json()).error.message);
  const reader = r.body.getReader(), decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    const {done, value} = await reader.read();
    // a stream that ends without data: [DONE] was cut (the server failed or the connection
    // dropped): not finished
    if (done) throw new Error('the stream ended before it was complete (no [DONE]); try again');
    // subtle: a network read may end mid-event (or mid-character: {stream: true} keeps the partial
    // bytes), so only the complete events before the last blank line are parsed; the rest waits for
    // the next read
    buf += decoder.decode(value, {stream: true});
    const events = buf.split('\n\n');
    buf = events.pop();
    for (const e of events) {
      const data = e.replace(/^data: /, '');
      if (data === '[DONE]') return;
      const j = JSON.parse(data);
      if (j.error) throw new Error(j.error.message);  // an error once the stream began is an event
      yield j;
    }
  }
}

// text made on the page, saved as a file
export function download(name, text, type) {
  const a = el('a', {href: URL.createObjectURL(new Blob([text], {type})), download: name});
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}
