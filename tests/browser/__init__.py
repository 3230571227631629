"""Real-browser tests of the admin dashboard (headless Chromium via Playwright)."""
