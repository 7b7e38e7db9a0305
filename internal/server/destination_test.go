package server

import (
	"errors"
	"net/http"
	"strings"
	"testing"

	"wsp/internal/httperr"
)

func TestParseDestination(t *testing.T) {
	for _, tc := range []struct {
		raw  string
		want string // "" for an error
	}{
		{"", ""},
		{"/relative/path", ""},
		{"example.com/x", ""},
		{"//example.com/x", ""},
		{"ftp://example.com/file", ""},
		{"mailto:a@example.com", ""},
		{"http://", ""},
		{"http://[::1", ""},
		{"ws://example.com/socket", "http://example.com/socket"},
		{"wss://example.com:8443/socket?x=1", "https://example.com:8443/socket?x=1"},
		{"http://example.com/x?y=1#f", "http://example.com/x?y=1#f"},
		{"https://example.com", "https://example.com"},
		{"HTTP://example.com/", "http://example.com/"},
		{"http://[::1]:8080/v", "http://[::1]:8080/v"},
	} {
		u, err := parseDestination(tc.raw)
		if tc.want == "" {
			var e *httperr.Error
			if !errors.As(err, &e) || e.Status != http.StatusBadRequest || e.Code != httperr.BadDestination {
				t.Errorf("parseDestination(%q) = %v, %v; want a 400 bad_destination", tc.raw, u, err)
				continue
			}
			if !strings.Contains(e.Msg, headerDestination) {
				t.Errorf("parseDestination(%q): %q does not name %s", tc.raw, e.Msg, headerDestination)
			}
			continue
		}
		if err != nil || u.String() != tc.want {
			t.Errorf("parseDestination(%q) = %v, %v; want %s", tc.raw, u, err, tc.want)
		}
	}
}

func TestOffers(t *testing.T) {
	for _, tc := range []struct {
		values []string
		want   bool
	}{
		{nil, false},
		{[]string{""}, false},
		{[]string{"wsp.v2"}, true},
		{[]string{"chat, wsp.v2"}, true},
		{[]string{"  wsp.v2  ,chat"}, true},
		{[]string{"chat,wsp.v2,"}, true},
		{[]string{"chat", "superchat, wsp.v2"}, true},
		{[]string{"wsp.v2x"}, false},
		{[]string{"xwsp.v2"}, false},
		{[]string{"wsp.v1, wsp.v3"}, false},
		{[]string{"wsp.v2;q=1"}, false},
		{[]string{"wsp v2"}, false},
	} {
		r, _ := http.NewRequest("GET", "http://wsp.test/register", nil)
		for _, v := range tc.values {
			r.Header.Add("Sec-WebSocket-Protocol", v)
		}
		if got := offers(r, "wsp.v2"); got != tc.want {
			t.Errorf("offers(%q) = %v, want %v", tc.values, got, tc.want)
		}
	}
}
