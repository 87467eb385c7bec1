"""Tests for CORS: preflight requests and the headers on simple requests, on the account
fast path and on the Klein routes behind it."""

from __future__ import annotations

from twisted.web.iweb import IResponse

from tests.test_http import APITestCase, resign, signing_seed
from tests.tokens import ACME, SHOP, fixture_jwt

ORIGIN = {"Origin": "https://console.example"}


def preflight_headers(method: str = "GET", requested: str | None = None) -> dict[str, str]:
    headers = dict(ORIGIN, **{"Access-Control-Request-Method": method})
    if requested is not None:
        headers["Access-Control-Request-Headers"] = requested
    return headers


class CORSTestCase(APITestCase):
    def setUp(self) -> None:
        super().setUp()
        self.acme = self.store_directly(fixture_jwt("ACME"))

    def assertSimpleCORS(self, response: IResponse) -> None:
        """Check the headers every request with an Origin header gets."""
        self.assertEqual(self.header(response, "Access-Control-Allow-Origin"), [b"*"])
        self.assertEqual(self.header(response, "Access-Control-Expose-Headers"), [b"ETag"])
        self.assertIsNone(self.header(response, "Access-Control-Allow-Credentials"))

    def assertNoCORS(self, response: IResponse) -> None:
        self.assertIsNone(self.header(response, "Access-Control-Allow-Origin"))
        self.assertIsNone(self.header(response, "Access-Control-Expose-Headers"))


class PreflightTests(CORSTestCase):
    """OPTIONS with Origin and Access-Control-Request-Method."""

    def assertPreflight(self, response: IResponse, body: bytes) -> None:
        self.assertEqual(response.code, 204)
        self.assertEqual(body, b"")
        self.assertEqual(self.header(response, "Access-Control-Allow-Origin"), [b"*"])
        self.assertEqual(self.header(response, "Access-Control-Allow-Methods"), [b"GET, HEAD, POST"])
        self.assertEqual(self.header(response, "Access-Control-Max-Age"), [b"7200"])
        self.assertIsNone(self.header(response, "Access-Control-Allow-Credentials"))
        vary = b",".join(self.header(response, "Vary") or [])
        self.assertIn(b"Access-Control-Request-Headers", vary)

    def test_preflight_fast_path_route(self) -> None:
        response, body = self.call("OPTIONS", f"/jwt/v1/accounts/{ACME}", headers=preflight_headers())
        self.assertPreflight(response, body)

    def test_preflight_account_upload(self) -> None:
        headers = preflight_headers("POST", "content-type")
        response, body = self.call("OPTIONS", f"/jwt/v1/accounts/{SHOP}", headers=headers)
        self.assertPreflight(response, body)
        self.assertEqual(self.header(response, "Access-Control-Allow-Headers"), [b"content-type"])

    def test_preflight_activation_upload(self) -> None:
        response, body = self.call("OPTIONS", "/jwt/v1/activations", headers=preflight_headers("POST"))
        self.assertPreflight(response, body)

    def test_preflight_help_route(self) -> None:
        response, body = self.call("OPTIONS", "/jwt/v1/help", headers=preflight_headers())
        self.assertPreflight(response, body)

    def test_requested_headers_echoed(self) -> None:
        headers = preflight_headers("GET", "If-None-Match, X-Trace-Id")
        response, _ = self.call("OPTIONS", f"/jwt/v1/accounts/{ACME}", headers=headers)
        self.assertEqual(self.header(response, "Access-Control-Allow-Headers"), [b"If-None-Match, X-Trace-Id"])

    def test_default_headers_without_request(self) -> None:
        response, _ = self.call("OPTIONS", f"/jwt/v1/accounts/{ACME}", headers=preflight_headers())
        self.assertEqual(self.header(response, "Access-Control-Allow-Headers"), [b"Content-Type, If-None-Match"])

    def test_malformed_requested_headers_not_echoed(self) -> None:
        for requested in ("a b", "x;y", "a,,b", "é", "x" * 2000):
            headers = preflight_headers("GET", requested)
            response, _ = self.call("OPTIONS", "/jwt/v1/help", headers=headers)
            self.assertEqual(
                self.header(response, "Access-Control-Allow-Headers"), [b"Content-Type, If-None-Match"], requested
            )

    def test_preflight_stores_nothing(self) -> None:
        headers = preflight_headers("POST")
        self.call("OPTIONS", f"/jwt/v1/accounts/{SHOP}", headers=headers, data=fixture_jwt("SHOP"))
        self.assertIsNone(self.harness.store.get(SHOP))

    def test_options_without_request_method_405(self) -> None:
        response, _ = self.call("OPTIONS", f"/jwt/v1/accounts/{ACME}", headers=ORIGIN)
        self.assertEqual(response.code, 405)
        self.assertIsNone(self.header(response, "Access-Control-Allow-Methods"))

    def test_options_without_origin_405(self) -> None:
        headers = {"Access-Control-Request-Method": "GET"}
        response, _ = self.call("OPTIONS", f"/jwt/v1/accounts/{ACME}", headers=headers)
        self.assertEqual(response.code, 405)


class SimpleRequestTests(CORSTestCase):
    """GET, HEAD and POST with an Origin header."""

    def test_fast_path_get(self) -> None:
        response, body = self.get(f"/jwt/v1/accounts/{ACME}", headers=ORIGIN)
        self.assertEqual(response.code, 200)
        self.assertEqual(body, fixture_jwt("ACME"))
        self.assertSimpleCORS(response)
        self.assertEqual(self.header(response, "Vary"), [b"Origin"])

    def test_fast_path_head(self) -> None:
        response, body = self.call("HEAD", f"/jwt/v1/accounts/{ACME}", headers=ORIGIN)
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"")
        self.assertSimpleCORS(response)

    def test_fast_path_304(self) -> None:
        headers = dict(ORIGIN, **{"If-None-Match": f'"{self.acme.jti}"'})
        response, _ = self.get(f"/jwt/v1/accounts/{ACME}", headers=headers)
        self.assertEqual(response.code, 304)
        self.assertSimpleCORS(response)
        self.assertEqual(self.header(response, "ETag"), [f'"{self.acme.jti}"'.encode()])

    def test_fast_path_without_origin(self) -> None:
        response, _ = self.get(f"/jwt/v1/accounts/{ACME}")
        self.assertEqual(response.code, 200)
        self.assertNoCORS(response)
        self.assertEqual(self.header(response, "Vary"), [b"Origin"])

    def test_klein_route_get(self) -> None:
        response, body = self.get(f"/jwt/v1/accounts/{ACME}?text=true", headers=ORIGIN)
        self.assertEqual(response.code, 200)
        self.assertEqual(body, fixture_jwt("ACME"))
        self.assertSimpleCORS(response)

    def test_klein_help_get(self) -> None:
        response, _ = self.get("/jwt/v1/help", headers=ORIGIN)
        self.assertEqual(response.code, 200)
        self.assertSimpleCORS(response)

    def test_klein_route_without_origin(self) -> None:
        response, _ = self.get("/jwt/v1/help")
        self.assertNoCORS(response)

    def test_klein_not_found(self) -> None:
        response, _ = self.get(f"/jwt/v1/accounts/{SHOP}", headers=ORIGIN)
        self.assertEqual(response.code, 404)
        self.assertSimpleCORS(response)

    def test_post_account(self) -> None:
        jwt = resign("SHOP", signing_seed(), iat=self.acme.issued_at + 10)
        response, body = self.post(f"/jwt/v1/accounts/{SHOP}", jwt, headers=ORIGIN)
        self.assertEqual(response.code, 200, body)
        self.assertSimpleCORS(response)

    def test_post_rejection_readable(self) -> None:
        response, body = self.post(f"/jwt/v1/accounts/{SHOP}", b"garbage", headers=ORIGIN)
        self.assertEqual(response.code, 400)
        self.assertSimpleCORS(response)

    def test_post_activation(self) -> None:
        response, _ = self.post("/jwt/v1/activations", b"garbage", headers=ORIGIN)
        self.assertEqual(response.code, 400)
        self.assertSimpleCORS(response)

    def test_put_has_no_cors(self) -> None:
        response, _ = self.call("PUT", f"/jwt/v1/accounts/{ACME}", headers=ORIGIN, data=b"x")
        self.assertEqual(response.code, 405)
        self.assertNoCORS(response)


class HelpTests(APITestCase):
    def test_help_describes_cors(self) -> None:
        _, body = self.get("/jwt/v1/help")
        self.assertIn("Access-Control-Allow-Origin: *", body.decode())
