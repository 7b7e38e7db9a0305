package test

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestGet(t *testing.T) {
	r, b := setup(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		w.Header().Set("X-Backend", "yes")
		fmt.Fprintf(w, "%s %s?%s", req.Method, req.URL.Path, req.URL.RawQuery)
	}))
	resp := do(t, r.request(t, "GET", b.URL+"/some/path?q=1", nil))
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	if got := readAll(t, resp.Body); got != "GET /some/path?q=1" {
		t.Fatalf("body %q", got)
	}
	if resp.Header.Get("X-Backend") != "yes" {
		t.Fatalf("backend header lost: %v", resp.Header)
	}
}

func TestProxyMode(t *testing.T) {
	r, b := setup(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		fmt.Fprintf(w, "host=%s path=%s", req.Host, req.URL.Path)
	}))
	req, _ := http.NewRequest("GET", b.URL+"/via/proxy", nil)
	tr := &http.Transport{Proxy: http.ProxyURL(mustParse(t, r.url)), DisableKeepAlives: true}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	want := "host=" + strings.TrimPrefix(b.URL, "http://") + " path=/via/proxy"
	if got := readAll(t, resp.Body); resp.StatusCode != 200 || got != want {
		t.Fatalf("status %d body %q, want %q", resp.StatusCode, got, want)
	}
}

func TestPostBodyHashed(t *testing.T) {
	r, b := setup(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		h := sha256.New()
		n, err := io.Copy(h, req.Body)
		if err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		fmt.Fprintf(w, "%d %x", n, h.Sum(nil))
	}))
	body := make([]byte, 8<<20)
	rand.Read(body)
	sum := sha256.Sum256(body)
	for _, chunked := range []bool{false, true} {
		var rd io.Reader = strings.NewReader(string(body))
		if chunked {
			rd = io.MultiReader(rd) // hides the length: sent chunked
		}
		resp := do(t, r.request(t, "POST", b.URL+"/upload", rd))
		want := fmt.Sprintf("%d %s", len(body), hex.EncodeToString(sum[:]))
		if got := readAll(t, resp.Body); resp.StatusCode != 200 || got != want {
			t.Fatalf("chunked=%v: status %d body %q, want %q", chunked, resp.StatusCode, got, want)
		}
	}
}

// TestEventsArriveOneByOne checks that each server-sent event reaches the
// app before the backend writes the next.
func TestEventsArriveOneByOne(t *testing.T) {
	next := make(chan struct{})
	r, b := setup(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		for i := 1; i <= 3; i++ {
			fmt.Fprintf(w, "data: %d\n\n", i)
			w.(http.Flusher).Flush()
			select {
			case <-next:
			case <-req.Context().Done():
				return
			case <-time.After(10 * time.Second):
				return
			}
		}
	}))
	resp := do(t, r.request(t, "GET", b.URL+"/events", nil))
	br := bufio.NewReader(resp.Body)
	for i := 1; i <= 3; i++ {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("event %d: %v", i, err)
		}
		if want := fmt.Sprintf("data: %d\n", i); line != want {
			t.Fatalf("event %d: got %q want %q", i, line, want)
		}
		br.ReadString('\n') // the blank line ending the event
		next <- struct{}{}
	}
}

func TestConcurrentRequestsGetTheirOwnAnswer(t *testing.T) {
	r := startServer(t, serverConfig(), nil)
	a := startClient(t, clientConfig(r, "c1"))
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		// Vary timing so answers come back out of order.
		if strings.HasSuffix(req.URL.Path, "7") {
			time.Sleep(5 * time.Millisecond)
		}
		io.WriteString(w, req.URL.Path)
	}))
	const n = 200
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			path := fmt.Sprintf("/req/%d", i)
			req := r.request(t, "GET", b.URL+path, nil)
			resp, err := testHTTP.Do(req)
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			got, err := io.ReadAll(resp.Body)
			if err != nil || resp.StatusCode != 200 || string(got) != path {
				errs <- fmt.Errorf("%s: status %d body %q err %v", path, resp.StatusCode, got, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// With nothing in flight, a client stops at once, whatever its many
	// idle streams were doing.
	start := time.Now()
	a.stop()
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("idle client took %v to stop", d)
	}
}

func TestCancellationReachesBackend(t *testing.T) {
	started := make(chan struct{})
	cancelled := make(chan struct{})
	r, b := setup(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		close(started)
		select {
		case <-req.Context().Done():
			close(cancelled)
		case <-time.After(20 * time.Second):
		}
	}))
	ctx, cancel := context.WithCancel(context.Background())
	req := r.request(t, "GET", b.URL+"/slow", nil).WithContext(ctx)
	errc := make(chan error, 1)
	go func() {
		resp, err := testHTTP.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		errc <- err
	}()
	<-started
	cancel()
	select {
	case <-cancelled:
	case <-time.After(10 * time.Second):
		t.Fatal("the backend never saw the request cancelled")
	}
	<-errc
}

func TestRedirectReturnedNotFollowed(t *testing.T) {
	r, b := setup(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.URL.Path == "/old" {
			http.Redirect(w, req, "/new", http.StatusFound)
			return
		}
		io.WriteString(w, "followed")
	}))
	resp := do(t, r.request(t, "GET", b.URL+"/old", nil))
	if resp.StatusCode != http.StatusFound || resp.Header.Get("Location") != "/new" {
		t.Fatalf("status %d location %q", resp.StatusCode, resp.Header.Get("Location"))
	}
}

func TestHeaderStripping(t *testing.T) {
	seen := make(chan http.Header, 1)
	r, b := setup(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		seen <- req.Header.Clone()
		w.Header().Set("Connection", "X-Drop-Me")
		w.Header().Set("X-Drop-Me", "hop")
		w.Header().Set("Keep-Alive", "timeout=5")
	}))
	req := r.request(t, "GET", b.URL+"/h", nil)
	req.Header.Set("X-Proxy-Client", "c1")
	req.Header.Set("X-Proxy-Anything", "secret routing detail")
	req.Header.Set("Connection", "X-Hop")
	req.Header.Set("X-Hop", "hop")
	req.Header.Set("Proxy-Connection", "keep-alive")
	req.Header.Set("X-Keep", "end-to-end")
	resp := do(t, req)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	h := <-seen
	for _, name := range []string{"X-Proxy-Destination", "X-Proxy-Client", "X-Proxy-Anything", "X-Hop", "Proxy-Connection"} {
		if v := h.Get(name); v != "" {
			t.Errorf("backend got %s: %q", name, v)
		}
	}
	if h.Get("X-Keep") != "end-to-end" {
		t.Errorf("end-to-end header lost")
	}
	if h.Get("X-Forwarded-For") != "127.0.0.1" || h.Get("X-Forwarded-Proto") != "http" || h.Get("X-Forwarded-Host") != r.addr {
		t.Errorf("X-Forwarded-*: for=%q proto=%q host=%q", h.Get("X-Forwarded-For"), h.Get("X-Forwarded-Proto"), h.Get("X-Forwarded-Host"))
	}
	if resp.Header.Get("X-Drop-Me") != "" || resp.Header.Get("Keep-Alive") != "" {
		t.Errorf("hop-by-hop response headers reached the app: %v", resp.Header)
	}
}

// TestHeadersBeforeBody: an answer whose body is slow to come reaches the
// app as soon as its head does.
func TestHeadersBeforeBody(t *testing.T) {
	release := make(chan struct{})
	r, b := setup(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(200)
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-req.Context().Done():
		}
	}))
	got := make(chan *http.Response, 1)
	go func() {
		resp, err := testHTTP.Do(r.request(t, "GET", b.URL+"/poll", nil))
		if err == nil {
			got <- resp
		}
	}()
	select {
	case resp := <-got:
		close(release)
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("status %d", resp.StatusCode)
		}
	case <-time.After(10 * time.Second):
		close(release)
		t.Fatal("the head did not reach the app before the body began")
	}
}
