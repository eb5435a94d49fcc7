// The live dashboard in a real browser: headless Chromium (Debian package `chromium`, installed by
// scripts/setup-test-deps.sh) driven by playwright-core, against simulated engines behind kvgate.
// The screenshot goes to a temporary file; KVGATE_UPDATE_SCREENSHOT=1 writes docs/img/dashboard.png
// (the one the README shows) instead.
import { existsSync, mkdtempSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium, type BrowserContext } from 'playwright-core';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { defaultServeConfig } from '../../src/config/serve-config.js';
import { SeededRng } from '../../src/core/rng.js';
import { Gateway } from '../../src/server/gateway.js';
import { startSimServer, type SimServer } from '../../src/sim/server.js';

const CHROMIUM = '/usr/bin/chromium';
const MODEL = 'kvgate-sim';
const APPS = [
  'You are the support assistant of an online bookshop. Answer in two sentences, cite the relevant policy section, and never invent order data. ',
  'You are a senior code reviewer. Point out bugs first, then style issues, each with a one-line fix. Keep a neutral tone and reference line numbers. ',
  'You are a travel planner. Suggest an itinerary with times, transport between stops and a budget estimate in euros. Prefer public transport. ',
  'You are a contracts analyst. Summarise obligations, deadlines and penalties as a table; flag anything unusual for legal review. ',
  'You are a data-science tutor. Explain with a small worked example in Python, then give one exercise with its answer hidden. ',
];

let sims: SimServer[] = [];
let gw: Gateway;
let browser: BrowserContext;

beforeAll(async () => {
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} not found: run scripts/setup-test-deps.sh (Debian package chromium)`);
  for (let i = 0; i < 4; i++) sims.push(await startSimServer({ host: '127.0.0.1', port: 0, model: MODEL, speed: 4, seed: i + 1 }));
  gw = new Gateway(
    defaultServeConfig({ host: '127.0.0.1', port: 0, healthCheckIntervalSecs: 0.5, engineMetricsIntervalSecs: 0.5, workerUrls: sims.map((s) => s.url), policy: 'cache_aware' }),
    { rng: new SeededRng(11), logger: pino({ level: 'silent' }) },
  );
  await gw.start();
  // A fresh profile directory each run (playwright passes it as --user-data-dir).
  browser = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), 'kvgate-chromium-')), {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1440, height: 1000 },
    deviceScaleFactor: 1,
  });
}, 60_000);

afterAll(async () => {
  await browser?.close();
  await gw?.close();
  await Promise.all(sims.map((s) => s.close()));
});

async function traffic(n: number, concurrency: number): Promise<number> {
  let ok = 0;
  let next = 0;
  const one = async () => {
    while (next < n) {
      const i = next++;
      const app = APPS[i % APPS.length];
      const res = await fetch(gw.url + '/v1/chat/completions', {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: MODEL, messages: [{ role: 'system', content: app.repeat(3) }, { role: 'user', content: `Request ${i}: ${'details '.repeat(i % 9)}` }], max_tokens: 12 + (i % 5) * 6, stream: i % 2 === 0, stream_options: i % 2 === 0 ? { include_usage: true } : undefined }),
      });
      await res.text();
      if (res.ok) ok++;
    }
  };
  await Promise.all(Array.from({ length: concurrency }, one));
  return ok;
}

describe('GET /dashboard in headless Chromium', () => {
  it('shows the workers, then live decisions with their explanations as traffic flows; works offline', async () => {
    const page = await browser.newPage();
    const external: string[] = [];
    page.on('request', (r) => {
      if (!r.url().startsWith(gw.url)) external.push(r.url());
    });
    const errors: string[] = [];
    page.on('pageerror', (e) => errors.push(e.message));
    await page.goto(gw.url + '/dashboard');
    await page.waitForFunction(() => document.querySelectorAll('#workers tbody tr[data-worker]').length === 4, undefined, { timeout: 15_000 });
    expect(await page.locator('#workers tbody tr[data-worker]').count()).toBe(4);
    // The page streams decisions: kvgate sees a watcher, so it explains every decision.
    await page.waitForFunction(() => document.querySelector('#live')?.classList.contains('on'), undefined, { timeout: 10_000 });
    expect(gw.core.feed.watcherCount).toBe(1);

    // For the README screenshot, traffic in waves so the sparklines have a shape.
    const waves = process.env.KVGATE_UPDATE_SCREENSHOT === '1' ? 8 : 1;
    const perWave = waves > 1 ? 10 + 0 : 60;
    let ok = 0;
    for (let w = 0; w < waves; w++) {
      ok += await traffic(perWave, 6);
      if (waves > 1) await new Promise((r) => setTimeout(r, 1000));
    }
    expect(ok).toBe(perWave * waves);
    await page.waitForFunction(() => document.querySelectorAll('#feed .dec').length >= 60, undefined, { timeout: 20_000 });
    // Every request's outcome arrived (its TTFT replaces the placeholder).
    await page.waitForFunction(() => [...document.querySelectorAll('#feed .dec [data-ttft]')].every((e) => e.textContent !== '…'), undefined, { timeout: 20_000 });
    // The state poll catches up: hit rate, prefix groups and the sparkline.
    await page.waitForFunction((n) => document.querySelector('#k-hit')?.textContent !== '–' && document.querySelectorAll('#groups .g').length >= n, APPS.length, { timeout: 15_000 }).catch(async () => {
      throw new Error('state did not render: ' + (await page.locator('main').innerText()));
    });
    const feedWorkers = await page.locator('#feed .dec .w').allInnerTexts();
    const ids = gw.registry.all().map((w) => w.id.replace(/^http:\/\//, ''));
    for (const w of feedWorkers) expect(ids.some((id) => w.startsWith(id))).toBe(true);
    // Open the newest decision: its explanation lists the 4 candidates.
    await page.locator('#feed .dec').first().click();
    const detail = page.locator('#feed .dec.open .detail');
    await expect.poll(async () => detail.locator('tbody tr').count()).toBe(4);
    expect(await detail.innerText()).toMatch(/prefix match|least loaded|imbalanced/);
    expect(await page.locator('#k-hit').innerText()).toMatch(/%$/);
    expect(await page.locator('#s-rate polyline').count()).toBe(1);
    expect(external).toEqual([]);
    expect(errors).toEqual([]);

    const out = process.env.KVGATE_UPDATE_SCREENSHOT === '1' ? 'docs/img/dashboard.png' : join(mkdtempSync(join(tmpdir(), 'kvgate-shot-')), 'dashboard.png');
    await page.screenshot({ path: out, fullPage: true });
    expect(statSync(out).size).toBeGreaterThan(20_000);
    await page.close();
    // The watcher left with the page.
    await expect.poll(() => gw.core.feed.watcherCount, { timeout: 5000 }).toBe(0);
  }, 90_000);
});
