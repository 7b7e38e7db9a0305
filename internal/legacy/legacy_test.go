package legacy

import (
	"encoding/json"
	"errors"
	"testing"
)

func TestGreeting(t *testing.T) {
	id, n, err := ParseGreeting(Greeting("6f1c-e2", 10))
	if err != nil || id != "6f1c-e2" || n != 10 {
		t.Fatalf("round trip: %q %d %v", id, n, err)
	}
	for _, bad := range []string{"", "abc", "a_b_c", "_10", "a_", "a_x", "a_-1"} {
		if _, _, err := ParseGreeting(bad); !errors.Is(err, ErrProtocol) {
			t.Errorf("%q: %v", bad, err)
		}
	}
}

func TestHeads(t *testing.T) {
	b, _ := json.Marshal(RequestHead{Method: "GET", URL: "http://x/y", Header: map[string][]string{"A": {"b"}}, ContentLength: -1})
	if string(b) != `{"Method":"GET","URL":"http://x/y","Header":{"A":["b"]},"ContentLength":-1}` {
		t.Fatalf("field names as root-gg/wsp writes them: %s", b)
	}
	if h, err := DecodeRequestHead(b); err != nil || h.URL != "http://x/y" {
		t.Fatal(h, err)
	}
	for _, bad := range []string{`{}`, `[`, `{"Method":"GET"}`} {
		if _, err := DecodeRequestHead([]byte(bad)); !errors.Is(err, ErrProtocol) {
			t.Errorf("%s: %v", bad, err)
		}
	}
	for _, bad := range []string{`{"StatusCode":0}`, `{"StatusCode":1000}`, `x`} {
		if _, err := DecodeResponseHead([]byte(bad)); !errors.Is(err, ErrProtocol) {
			t.Errorf("%s: %v", bad, err)
		}
	}
}

func FuzzLegacyMessages(f *testing.F) {
	f.Add("abc_10", []byte(`{"Method":"GET","URL":"http://x/"}`), []byte(`{"StatusCode":200}`))
	f.Fuzz(func(t *testing.T, greeting string, req, resp []byte) {
		if id, n, err := ParseGreeting(greeting); err == nil && (id == "" || n < 0) {
			t.Fatalf("accepted %q", greeting)
		}
		if h, err := DecodeRequestHead(req); err == nil && (h.Method == "" || h.URL == "") {
			t.Fatalf("accepted %q", req)
		}
		if h, err := DecodeResponseHead(resp); err == nil && (h.StatusCode < 100 || h.StatusCode > 999) {
			t.Fatalf("accepted %q", resp)
		}
	})
}
