package server

import (
	"bytes"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"wsp/internal/config"
	"wsp/internal/httperr"
)

// clusterServer is a Server with a Redis directory that is never reached
// (nothing listens on port 1): these tests must not need it.
func clusterServer(t *testing.T, logs *bytes.Buffer) *Server {
	t.Helper()
	cfg := config.DefaultServer()
	cfg.Timeout = config.Duration(20 * time.Millisecond)
	cfg.Cluster = config.Cluster{Node: "node-a", Redis: "redis://127.0.0.1:1/0", Advertise: "http://127.0.0.1:8080", Secret: "s3cret-value", TTL: config.Duration(15 * time.Second)}
	log := slog.New(slog.DiscardHandler)
	if logs != nil {
		log = slog.New(slog.NewTextHandler(logs, nil))
	}
	s, err := New(cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.closeCluster)
	return s
}

func TestFromNode(t *testing.T) {
	var logs bytes.Buffer
	s := clusterServer(t, &logs)
	plain, err := New(config.DefaultServer(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name         string
		srv          *Server
		node, secret string
		want         string // the node name accepted
		status       int
		code         string
	}{
		{"an app's request", s, "", "", "", 0, ""},
		{"the right secret", s, "node-b", "s3cret-value", "node-b", 0, ""},
		{"no secret", s, "node-b", "", "", 401, httperr.Unauthorized},
		{"a wrong secret", s, "node-b", "s3cret-valuX", "", 403, httperr.Forbidden},
		{"a longer wrong secret", s, "node-b", "s3cret-value-and-more", "", 403, httperr.Forbidden},
		{"a secret and no node name", s, "", "s3cret-value", "", 400, httperr.BadRequest},
		{"an invalid node name", s, "node b\x7f", "s3cret-value", "", 400, httperr.BadRequest},
		{"a server without a cluster", plain, "node-b", "s3cret-value", "", 403, httperr.Forbidden},
	} {
		r := httptest.NewRequest("GET", "/request", nil)
		if tc.node != "" {
			r.Header.Set(headerClusterNode, tc.node)
		}
		if tc.secret != "" {
			r.Header.Set(headerClusterSecret, tc.secret)
		}
		got, e := tc.srv.fromNode(r)
		switch {
		case tc.status == 0 && (e != nil || got != tc.want):
			t.Errorf("%s: got %q, %v; want %q accepted", tc.name, got, e, tc.want)
		case tc.status != 0 && (e == nil || e.Status != tc.status || e.Code != tc.code || got != ""):
			t.Errorf("%s: got %q, %v; want %d %s", tc.name, got, e, tc.status, tc.code)
		}
		if e != nil && strings.Contains(e.Error(), "s3cret") {
			t.Errorf("%s: the refusal names the secret: %s", tc.name, e)
		}
		if r.Header.Get(headerClusterNode) != "" || r.Header.Get(headerClusterSecret) != "" {
			t.Errorf("%s: cluster headers left on the request", tc.name)
		}
	}
	if strings.Contains(logs.String(), "s3cret") {
		t.Fatalf("a secret was logged:\n%s", logs.String())
	}
	if n := strings.Count(logs.String(), "node request refused"); n != 5 {
		t.Fatalf("%d refusals logged, want 5:\n%s", n, logs.String())
	}
}

// TestNodeRequestIsNeverForwarded: a node request for a client this node
// does not hold is answered here: the directory is not even asked (it is
// unreachable here; asking would show in the message), so no loop can form.
func TestNodeRequestIsNeverForwarded(t *testing.T) {
	s := clusterServer(t, nil)
	for _, tc := range []struct {
		name string
		node string
		want string
	}{
		{"from a node", "node-b", `no client with id "dc1" is connected` + "\n"},
		{"from an app", "", `no client with id "dc1" is connected to this node, and the cluster directory could not be asked about the others`},
	} {
		r := httptest.NewRequest("GET", "/request", nil)
		r.Header.Set(headerDestination, "http://api.internal/x")
		r.Header.Set(headerClient, "dc1")
		if tc.node != "" {
			r.Header.Set(headerClusterNode, tc.node)
			r.Header.Set(headerClusterSecret, "s3cret-value")
		}
		w := httptest.NewRecorder()
		s.ServeHTTP(w, r)
		if w.Code != http.StatusServiceUnavailable || w.Header().Get(httperr.Header) != httperr.NoClient || !strings.Contains(w.Body.String(), tc.want) {
			t.Errorf("%s: %d %s %q, want 503 no_client with %q", tc.name, w.Code, w.Header().Get(httperr.Header), w.Body.String(), tc.want)
		}
		if v := w.Header().Get("Via"); v != "" {
			t.Errorf("%s: answered with Via %q: it was forwarded", tc.name, v)
		}
	}
	if got := s.cluster.forwarded.Load(); got != 0 {
		t.Fatalf("%d requests forwarded", got)
	}
}
