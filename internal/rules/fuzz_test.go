package rules

import (
	"net/http"
	"testing"
)

// FuzzRules compiles arbitrary rules and checks arbitrary requests against
// them: no input may panic, and a set that compiled always gives a verdict
// consistent with its parts.
func FuzzRules(f *testing.F) {
	f.Add("^GET$", "^http://api\\.internal/", "X-Tenant", "^acme$", "GET", "http://api.internal/x", "acme")
	f.Add("", "(", "", "", "POST", "", "")
	f.Add("", "db\\.internal:5432$", "", "", "CONNECT", "db.internal:5432", "")
	f.Fuzz(func(t *testing.T, method, url, header, value, reqMethod, reqURL, reqValue string) {
		spec := Spec{Method: method, URL: url}
		if header != "" {
			spec.Headers = map[string]string{header: value}
		}
		rule, err := Compile(spec)
		if err != nil {
			return
		}
		h := http.Header{}
		if header != "" && validHeaderName(header) {
			h.Set(header, reqValue)
		}
		match := rule.Match(reqMethod, reqURL, h)
		white, err := NewSet([]Spec{spec}, nil)
		if err != nil {
			t.Fatalf("Compile accepted %+v, NewSet refused it: %v", spec, err)
		}
		if allowed := white.Check(reqMethod, reqURL, h) == nil; allowed != match {
			t.Fatalf("whitelist of one rule: allowed=%v, rule matches=%v", allowed, match)
		}
		black, _ := NewSet(nil, []Spec{spec})
		if allowed := black.Check(reqMethod, reqURL, h) == nil; allowed == match {
			t.Fatalf("blacklist of one rule: allowed=%v, rule matches=%v", allowed, match)
		}
	})
}
