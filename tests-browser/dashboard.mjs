// Opens Baton's dashboard in headless Chromium (Debian's, driven by playwright-core), lets it
// poll for a while, and prints what its charts hold; saves a screenshot.
// Usage: node dashboard.mjs URL SCREENSHOT.png SECONDS [MESSAGE_ID to look up]
import { chromium } from "playwright-core";

const [url, screenshot, seconds, messageId] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const requests = [];
  page.on("request", r => requests.push(r.url()));
  await page.goto(url);
  await page.waitForFunction(n => window.batonDashboard && window.batonDashboard.ticks >= n,
                             Number(seconds), { timeout: 60000 });
  const state = await page.evaluate(() => window.batonDashboard);
  const destinations = await page.$$eval("#destinations tr", rows => rows.map(r => r.innerText));
  const status = await page.textContent("#status");
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
  console.log(JSON.stringify({ state, destinations, status, foreign, lookup }));
} finally {
  await browser.close();
}
