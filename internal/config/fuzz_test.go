package config

import (
	"errors"
	"testing"
)

var fuzzSeeds = []string{
	"",
	"host: 0.0.0.0\nport: 8080\ntimeout: 1000\nidletimeout: 1m\n",
	"whitelist:\n  - method: ^GET$\n    url: internal\n    headers: {X-A: b}\nblacklist: [{url: admin}]\n",
	"id: dc1\ntargets: [ws://a/register]\nallowany: true\npoolmaxsize: 5\n",
	"whitelist: &w [{url: a}]\nblacklist: *w\n",
	"a: &a [*a]\n",
	"port: [1\n",
	"- 1\n",
	"---\n---\n",
	"timeout: -1\n",
	"? {a: b}\n: c\n",
	"keepalive: 99999999999999999999\n",
}

// checkLoadError asserts the contract of the decoders: any error is a *Error.
func checkLoadError(t *testing.T, err error) {
	if err == nil {
		return
	}
	if _, ok := errors.AsType[*Error](err); !ok {
		t.Fatalf("error %v (%T) is not a *Error", err, err)
	}
	if err.Error() == "" {
		t.Fatal("empty error message")
	}
}

func FuzzLoadServer(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := decodeServer(data, "fuzz.yaml")
		checkLoadError(t, err)
		if err == nil {
			checkLoadError(t, s.Validate())
		}
	})
}

func FuzzLoadClient(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := decodeClient(data, "fuzz.yaml")
		checkLoadError(t, err)
		if err == nil {
			checkLoadError(t, c.Validate())
		}
	})
}
