// Opens Baton's dashboard in headless Chromium (Debian's, driven by playwright-core), lets it
// poll for a while, and prints what its charts hold; saves a screenshot.
// Usage: node dashboard.mjs URL SCREENSHOT.png SECONDS [MESSAGE_ID to look up]
// Also prints the y-axis labels painted on each chart (every frame of the run, and frames
// drawn on demand with small series), and, once a bounce is listed, the widths of the recent
// bounces card.
import { launch } from "./browser.mjs";

const [url, screenshot, seconds, messageId] = process.argv.slice(2);
const browser = await launch();
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const requests = [];
  page.on("request", r => requests.push(r.url()));
  // Records the text painted on each canvas, one frame per clearRect: the axis labels.
  await page.addInitScript(() => {
    const frames = window.__canvasText = {};
    const proto = CanvasRenderingContext2D.prototype;
    const { clearRect, fillText } = proto;
    proto.clearRect = function (...args) {
      (frames[this.canvas.id] ||= []).push([]);
      return clearRect.apply(this, args);
    };
    proto.fillText = function (text, ...args) {
      const list = frames[this.canvas.id] ||= [[]];
      list[list.length - 1].push(String(text));
      return fillText.call(this, text, ...args);
    };
  });
  await page.goto(url);
  await page.waitForFunction(n => window.batonDashboard && window.batonDashboard.ticks >= n,
                             Number(seconds), { timeout: 60000 });
  const state = await page.evaluate(() => window.batonDashboard);
  const destinations = await page.$$eval("#destinations tr", rows => rows.map(r => r.innerText));
  const status = await page.textContent("#status");
  const clusterHidden = await page.$eval("#cluster", s => s.hidden);
  const axes = await page.evaluate(() => window.__canvasText);
  // The page's own draw() with small series (as a quiet server has), one frame each.
  const small = await page.evaluate(() => {
    const out = [];
    for (const series of [[], [0], [0.4], [1], [0, 1, 0], [2], [1.5, 3], [4], [5], [7], [12]]) {
      draw("rate-chart", series, "#15803d");
      out.push({ series, labels: window.__canvasText["rate-chart"].at(-1) });
    }
    draw("rate-chart", window.batonDashboard.rate, "#15803d");
    return out;
  });
  await page.waitForFunction(() => document.querySelectorAll("#bounces tr").length > 0, null,
                             { timeout: 30000 });
  const bounces = await page.evaluate(() => {
    const card = document.getElementById("bounces").closest("section");
    const neighbour = document.getElementById("destinations").closest("section");
    const width = e => e.getBoundingClientRect().width;
    return {
      rows: [...document.querySelectorAll("#bounces tr")].map(r => r.innerText),
      longest: Math.max(...[...document.querySelectorAll("#bounces td")]
        .map(td => Math.max(td.textContent.length, (td.querySelector("[title]") || td).title.length))),
      card: { width: width(card), scrollWidth: card.scrollWidth, clientWidth: card.clientWidth },
      table: width(card.querySelector("table")),
      neighbour: width(neighbour),
      page: { scrollWidth: document.documentElement.scrollWidth,
              clientWidth: document.documentElement.clientWidth },
    };
  });
  await page.waitForFunction(() => document.querySelectorAll("#classes tr").length > 0, null,
                             { timeout: 30000 });
  const classes = await page.$$eval("#classes tr", rows => rows.map(r => r.innerText));
  const complaints = await page.$$eval("#complaints tr", rows => rows.map(r => r.innerText));
  let lookup = null;
  if (messageId) {
    await page.fill("#message-id", messageId);
    await page.click("#lookup button");
    await page.waitForFunction(id => document.getElementById("message").textContent.includes(id),
                               messageId, { timeout: 30000 });
    lookup = JSON.parse(await page.textContent("#message"));
  }
  await page.screenshot({ path: screenshot, fullPage: true });
  const foreign = requests.filter(u => !u.startsWith(new URL(url).origin));
  console.log(JSON.stringify({ state, destinations, status, foreign, lookup, axes, small, bounces,
                               classes, complaints, clusterHidden }));
} finally {
  await browser.close();
}
