// Stress: beyond the design load, 100 -> 200 -> 300 VUs in steps, to find
// where latency and errors start to climb. Thresholds are looser than the
// release gate: the question is how it degrades (429/529 and slower, never
// hangs or 5xx storms), not whether it meets the SLO at 6x the design load.
//   make loadtest SCRIPT=gateway-stress.js          # ~11 min
import exec from 'k6/execution';
import { latency, mixedIteration, stages } from './lib/common.js';

export const options = {
  scenarios: {
    stress: {
      executor: 'ramping-vus',
      startVUs: 0,
      stages: stages([
        [60, 100], [120, 100],
        [60, 200], [120, 200],
        [60, 300], [120, 300],
        [60, 0],
      ]),
      gracefulRampDown: '15s',
    },
  },
  thresholds: {
    http_req_failed: ['rate<0.05'],
    ...latency({
      gateway_latency: ['p(95)<250'],
      'http_req_duration{endpoint:health}': ['p(99)<500'],
    }),
  },
};

export default function () {
  mixedIteration(exec.vu.iterationInScenario);
}
