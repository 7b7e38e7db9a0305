package test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// chromiumPath returns the browser to drive: $CHROMIUM, else
// /usr/bin/chromium, else "" when neither is there.
func chromiumPath() string {
	for _, p := range []string{os.Getenv("CHROMIUM"), "/usr/bin/chromium"} {
		if p == "" {
			continue
		}
		if path, err := exec.LookPath(p); err == nil {
			return path
		}
	}
	return ""
}

// TestDashboard loads the admin page in headless Chromium while a client is
// connected and one request is in flight, and checks that the page shows
// them. It saves screenshots at desktop and phone widths for a person to
// look at: in $WSP_SCREENSHOT_DIR when set.
func TestDashboard(t *testing.T) {
	browser := chromiumPath()
	if browser == "" {
		t.Skip("no Chromium: install it (apt-get install chromium; .ci/run does) or set CHROMIUM to its path")
	}
	shots := os.Getenv("WSP_SCREENSHOT_DIR")
	if shots == "" {
		shots = t.TempDir()
	} else if err := os.MkdirAll(shots, 0o755); err != nil {
		t.Fatal(err)
	}

	r := startServer(t, serverConfig(), nil)
	startClient(t, clientConfig(r, "dash-client"))
	adm := httptest.NewServer(r.srv.AdminHandler())
	t.Cleanup(adm.Close)

	release := make(chan struct{})
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		// Some body too: the wsp client passes the response head on with
		// the first body bytes, not on the destination's flush alone.
		io.WriteString(w, "started\n")
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-req.Context().Done():
		}
	}))
	var once sync.Once
	// Registered after backend's Close, so it runs first and the handler
	// returns before the backend waits for it.
	t.Cleanup(func() { once.Do(func() { close(release) }) })

	// One failure, so the recent errors and the session's last error show.
	readAll(t, do(t, r.request(t, "GET", "http://127.0.0.1:1/", nil)).Body)
	// The response's headers arrive; its body waits for release.
	do(t, r.request(t, "GET", b.URL+"/slow", nil))
	waitFor(t, "the request in flight", func() bool { return r.inflight() == 1 })

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	actx, stopBrowser := chromedp.NewExecAllocator(ctx,
		chromedp.ExecPath(browser),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.UserDataDir(t.TempDir()),
	)
	// Waits for Chromium to exit, so neither its process nor chromedp's
	// goroutines outlive the test (goleak runs after the tests).
	defer stopBrowser()
	bctx, closeTab := chromedp.NewContext(actx, chromedp.WithLogf(t.Logf))
	defer closeTab()

	// The row appears, and the request in flight is counted on it and in the
	// totals; the failed request is listed; polling works.
	const shown = `(() => {
		const row = document.querySelector('#sessions tr[data-client="dash-client"]');
		return !!row && row.cells[0].textContent === 'dash-client' &&
			row.querySelector('.in-flight').textContent === '1' &&
			document.getElementById('t-in-flight').textContent === '1' &&
			document.querySelector('#errors tbody').textContent.includes('dial_failed') &&
			document.getElementById('error').hidden;
	})()`
	err := chromedp.Do(bctx,
		chromedp.EmulateViewport(1280, 800),
		chromedp.Navigate(adm.URL+"/"),
		chromedp.Poll[chromedp.Void](shown, chromedp.WithPollingInterval(50*time.Millisecond), chromedp.WithPollingTimeout(20*time.Second)),
	)
	if errors.Is(err, chromedp.ErrPollingTimeout) {
		page, _ := chromedp.Run(bctx, chromedp.Evaluate[string](`document.body.innerText`))
		t.Fatalf("the dashboard does not show dash-client with 1 request in flight; it shows:\n%s", page)
	}
	if err != nil {
		t.Fatal(err)
	}
	screenshot(t, bctx, filepath.Join(shots, "dashboard-1280.png"))

	if err := chromedp.Do(bctx,
		chromedp.EmulateViewport(390, 844, chromedp.EmulatePortrait, chromedp.EmulateMobile, chromedp.EmulateScale(2)),
		// A frame after the resize, so the phone layout is in place.
		chromedp.Poll[chromedp.Void](`document.documentElement.clientWidth === 390`),
	); err != nil {
		t.Fatal(err)
	}
	overflow, err := chromedp.Run(bctx, chromedp.Evaluate[bool](`document.documentElement.scrollWidth > document.documentElement.clientWidth`))
	if err != nil {
		t.Fatal(err)
	}
	if overflow {
		t.Error("at 390 px the page scrolls sideways")
	}
	screenshot(t, bctx, filepath.Join(shots, "dashboard-390.png"))
}

func screenshot(t *testing.T, ctx context.Context, path string) {
	t.Helper()
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s", path)
}
