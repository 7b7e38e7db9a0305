package tunnel

import (
	"bufio"
	"bytes"
	"errors"
	"net/http"
	"reflect"
	"strings"
	"testing"
)

func TestHelloRoundTrip(t *testing.T) {
	for _, h := range []Hello{
		{ClientID: "dc1", MaxStreams: 1},
		{ClientID: "a", SecretKey: "s3cret", MaxStreams: MaxStreamsLimit, Version: "v1.2.3 (abc)"},
		{ClientID: strings.Repeat("x", 128), MaxStreams: 100, Version: strings.Repeat("v", maxVersionLen)},
		{ClientID: "9A.b_c-", MaxStreams: 7, Version: "~!@#$%^&*()"},
	} {
		got, err := ParseHello(h.Header())
		if err != nil || !reflect.DeepEqual(got, h) {
			t.Errorf("ParseHello(%+v.Header()) = %+v, %v", h, got, err)
		}

		// The same through the wire, as an upgrade request carries it.
		req, _ := http.NewRequest("GET", "http://wsp.test/register", nil)
		req.Header = h.Header()
		var buf bytes.Buffer
		if err := req.Write(&buf); err != nil {
			t.Fatal(err)
		}
		in, err := http.ReadRequest(bufio.NewReader(&buf))
		if err != nil {
			t.Fatal(err)
		}
		if got, err := ParseHello(in.Header); err != nil || !reflect.DeepEqual(got, h) {
			t.Errorf("over the wire: %+v, %v; want %+v", got, err, h)
		}
	}
}

func TestHelloHeaderOmitsEmpty(t *testing.T) {
	hdr := Hello{ClientID: "c", MaxStreams: 3}.Header()
	for _, name := range []string{HeaderSecretKey, HeaderVersion} {
		if _, ok := hdr[name]; ok {
			t.Errorf("%s set for an empty value", name)
		}
	}
}

func TestParseHelloDefaultMaxStreams(t *testing.T) {
	h, err := ParseHello(http.Header{HeaderClientID: {"c1"}})
	if err != nil {
		t.Fatal(err)
	}
	if h.MaxStreams != MaxStreamsLimit {
		t.Fatalf("MaxStreams = %d, want %d when the header is absent", h.MaxStreams, MaxStreamsLimit)
	}
}

func TestParseHelloBad(t *testing.T) {
	for _, tc := range []struct {
		name       string
		id, max, v string
		want       string // the header the error must name
	}{
		{"empty id", "", "", "", HeaderClientID},
		{"id with space", "a b", "", "", HeaderClientID},
		{"id with slash", "a/b", "", "", HeaderClientID},
		{"id too long", strings.Repeat("a", 129), "", "", HeaderClientID},
		{"id starting with dot", ".a", "", "", HeaderClientID},
		{"id starting with dash", "-a", "", "", HeaderClientID},
		{"id non-ASCII", "dé", "", "", HeaderClientID},
		{"id with newline", "a\nb", "", "", HeaderClientID},
		{"max streams 0", "c", "0", "", HeaderMaxStreams},
		{"max streams -1", "c", "-1", "", HeaderMaxStreams},
		{"max streams 65537", "c", "65537", "", HeaderMaxStreams},
		{"max streams abc", "c", "abc", "", HeaderMaxStreams},
		{"max streams 1.5", "c", "1.5", "", HeaderMaxStreams},
		{"max streams huge", "c", "99999999999999999999999", "", HeaderMaxStreams},
		{"version with NUL", "c", "", "v1\x00", HeaderVersion},
		{"version with newline", "c", "", "v1\nX-Evil: 1", HeaderVersion},
		{"version with DEL", "c", "", "v\x7f", HeaderVersion},
		{"version non-ASCII", "c", "", "vé", HeaderVersion},
		{"version 65 chars", "c", "", strings.Repeat("v", 65), HeaderVersion},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hdr := http.Header{}
			hdr.Set(HeaderClientID, tc.id)
			if tc.max != "" {
				hdr.Set(HeaderMaxStreams, tc.max)
			}
			if tc.v != "" {
				hdr.Set(HeaderVersion, tc.v)
			}
			h, err := ParseHello(hdr)
			if !errors.Is(err, ErrBadHello) {
				t.Fatalf("err = %v, want one wrapping ErrBadHello", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err %q does not name %s", err, tc.want)
			}
			if !reflect.DeepEqual(h, Hello{}) {
				t.Errorf("got %+v with the error, want the zero Hello", h)
			}
		})
	}
}

// A hostile id does not make a hostile log line.
func TestParseHelloErrorTruncated(t *testing.T) {
	_, err := ParseHello(http.Header{HeaderClientID: {strings.Repeat("/", 10000)}})
	if err == nil || len(err.Error()) > 300 {
		t.Fatalf("err = %.400v (%d bytes)", err, len(err.Error()))
	}
}

func TestValidID(t *testing.T) {
	for id, want := range map[string]bool{
		"a": true, "0": true, "dc1.eu-west_2": true, strings.Repeat("z", 128): true,
		"": false, "_a": false, "a b": false, "a:b": false, strings.Repeat("z", 129): false, "a\n": false,
	} {
		if got := ValidID(id); got != want {
			t.Errorf("ValidID(%q) = %v, want %v", id, got, want)
		}
	}
}

func FuzzParseHello(f *testing.F) {
	f.Add("dc1", "10", "v1.0", "")
	f.Add("", "", "", "")
	f.Add("a b", "0", "\x00", "key")
	f.Add(strings.Repeat("x", 129), "65537", strings.Repeat("v", 65), "")
	f.Add("x", "+5", "dev", "s3cret")
	f.Add("x", "0010", " spaced ", "")
	f.Add("x\n", "-0", "é", "\r\n")
	f.Fuzz(func(t *testing.T, id, maxStreams, version, secret string) {
		hdr := http.Header{}
		hdr.Set(HeaderClientID, id)
		hdr.Set(HeaderMaxStreams, maxStreams)
		hdr.Set(HeaderVersion, version)
		hdr.Set(HeaderSecretKey, secret)
		h, err := ParseHello(hdr)
		if err != nil {
			if !errors.Is(err, ErrBadHello) {
				t.Fatalf("err %v does not wrap ErrBadHello", err)
			}
			if !reflect.DeepEqual(h, Hello{}) {
				t.Fatalf("got %+v with an error", h)
			}
			return
		}
		if !ValidID(h.ClientID) {
			t.Fatalf("accepted invalid id %q", h.ClientID)
		}
		if h.MaxStreams < 1 || h.MaxStreams > MaxStreamsLimit {
			t.Fatalf("accepted MaxStreams %d", h.MaxStreams)
		}
		if len(h.Version) > maxVersionLen {
			t.Fatalf("accepted a %d-byte version", len(h.Version))
		}
		again, err := ParseHello(h.Header())
		if err != nil {
			t.Fatalf("re-parse of %+v: %v", h, err)
		}
		if !reflect.DeepEqual(again, h) {
			t.Fatalf("round trip: %+v, want %+v", again, h)
		}
	})
}

func TestUpgradeType(t *testing.T) {
	for _, tc := range []struct {
		conn, upgrade, want string
	}{
		{"Upgrade", "websocket", "websocket"},
		{"keep-alive, upgrade", "h2c", "h2c"},
		{"keep-alive", "websocket", ""},
		{"", "websocket", ""},
	} {
		h := http.Header{}
		if tc.conn != "" {
			h.Set("Connection", tc.conn)
		}
		h.Set("Upgrade", tc.upgrade)
		if got := UpgradeType(h); got != tc.want {
			t.Errorf("Connection %q Upgrade %q: %q, want %q", tc.conn, tc.upgrade, got, tc.want)
		}
	}
}
