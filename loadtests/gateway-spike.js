// Spike: 10 VUs, then 500 within 10 s, hold, back to 10, and measure how long
// the gateway takes to recover (recovery_time): a probe VU sends one request
// every 250 ms throughout; after the spike ends, recovery is the first moment
// when 3 probes in a row succeed within max(2 x baseline, baseline + 25 ms),
// baseline being the probes' median before the spike.
//   make loadtest SCRIPT=gateway-spike.js           # ~2.5 min
import exec from 'k6/execution';
import http from 'k6/http';
import { sleep } from 'k6';
import { Trend } from 'k6/metrics';
import { API_KEY, BASE_URL, latency, MODEL, mixedIteration, record, SCALE, stages } from './lib/common.js';

const recoveryTime = new Trend('recovery_time', true);

// [seconds, target VUs], before scaling.
const PLAN = [[30, 10], [10, 500], [30, 500], [10, 10], [60, 10]];
const scaled = PLAN.map(([s]) => Math.max(1, Math.round(s * SCALE)));
const WARM_S = scaled[0];
const SPIKE_END_S = scaled[0] + scaled[1] + scaled[2] + scaled[3];
const TOTAL_S = scaled.reduce((a, b) => a + b, 0);

export const options = {
  scenarios: {
    spike: { executor: 'ramping-vus', startVUs: 10, stages: stages(PLAN), gracefulRampDown: '10s', exec: 'spike' },
    probe: { executor: 'constant-vus', vus: 1, duration: `${TOTAL_S}s`, exec: 'probe' },
  },
  thresholds: {
    http_req_failed: ['rate<0.05'],
    'http_req_failed{scenario:probe}': ['rate<0.05'],
    recovery_time: [{ threshold: `max<${Math.max(5000, 30000 * SCALE)}`, abortOnFail: false }],
    ...latency({ 'gateway_latency{scenario:probe}': ['p(95)<100'] }),
  },
};

export function spike() {
  mixedIteration(exec.vu.iterationInScenario);
}

const body = JSON.stringify({ model: MODEL, max_tokens: 32, messages: [{ role: 'user', content: 'ping' }] });
const params = {
  headers: { 'content-type': 'application/json', 'anthropic-version': '2023-06-01', 'x-api-key': API_KEY },
  tags: { endpoint: 'probe', name: '/v1/messages' },
  timeout: '30s',
};
const warm = [];
let baseline = null;
let streak = 0;
let done = false;

export function probe() {
  const t0 = exec.scenario.startTime;
  const res = http.post(`${BASE_URL}/v1/messages`, body, params);
  record(res, { endpoint: 'probe' });
  const now = (Date.now() - t0) / 1000;
  const ms = res.timings.duration;
  if (now > 5 && now < WARM_S) warm.push(ms);
  if (baseline === null && now >= WARM_S && warm.length) {
    const sorted = warm.slice().sort((a, b) => a - b);
    baseline = sorted[Math.floor(sorted.length / 2)];
  }
  if (!done && baseline !== null && now >= SPIKE_END_S) {
    const ok = res.status === 200 && ms <= Math.max(2 * baseline, baseline + 25);
    streak = ok ? streak + 1 : 0;
    if (streak >= 3) {
      recoveryTime.add(Math.max(0, (now - SPIKE_END_S) * 1000));
      done = true;
    } else if (now >= TOTAL_S - 1) {
      recoveryTime.add((now - SPIKE_END_S) * 1000); // never recovered within the window
      done = true;
    }
  }
  sleep(0.25);
}
