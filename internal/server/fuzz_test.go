package server

import (
	"net/http"
	"strings"
	"testing"

	"wsp/internal/config"
)

// FuzzDestination: any X-PROXY-DESTINATION is either refused with a 400 or
// yields an absolute http(s) URL with a host.
func FuzzDestination(f *testing.F) {
	for _, s := range []string{"http://api.internal:9000/x?y=1", "ws://h/", "wss://h:1", "ftp://h/", "/rel", "", "http://[::1]:80/", "http://%zz/", "https://user:pw@h/"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		u, err := parseDestination(raw)
		if err != nil {
			if !strings.Contains(err.Error(), "X-Proxy-Destination") {
				t.Fatalf("error does not name the header: %v", err)
			}
			return
		}
		if u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
			t.Fatalf("accepted %q as %q", raw, u)
		}
	})
}

// FuzzCredentials: arbitrary Authorization values never panic, and only
// the configured ones pass.
func FuzzCredentials(f *testing.F) {
	a := config.Auth{Tokens: []string{"tok"}, Users: map[string]string{"alice": "pw"}}
	for _, s := range []string{"Bearer tok", "Basic YWxpY2U6cHc=", "Basic !!!", "bearer  tok ", "Basic YWxpY2U6", "Digest x", "", "Bearer"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, value string) {
		ok := credentialOK(a, value)
		req := &http.Request{Header: http.Header{"Proxy-Authorization": {value}}}
		_ = proxyUser(req)
		scheme, cred, _ := strings.Cut(value, " ")
		cred = strings.TrimSpace(cred)
		if ok && !(strings.EqualFold(scheme, "Bearer") && cred == "tok") && !strings.EqualFold(scheme, "Basic") {
			t.Fatalf("%q accepted", value)
		}
	})
}
