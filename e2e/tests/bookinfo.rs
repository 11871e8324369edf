//! Bookinfo through the mesh, each workload from its sample Deployment's
//! injected pod spec (in the namespace variant): the product page with its
//! details and reviews through the ingress gateway, and a user's own route.

use std::time::{Duration, Instant};

use mesh_e2e::mesh::{LocalMesh, workload};

const SUBSETS: &str = include_str!("../../samples/bookinfo/networking/destination-rule-all.yaml");
const JASON: &str =
    include_str!("../../samples/bookinfo/networking/virtual-service-reviews-jason-v2.yaml");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookinfo_serves_its_product_page_and_routes_jason_to_v2() {
    let m = LocalMesh::start(
        "bookinfo",
        &[
            ("productpage", 9080),
            ("details", 9080),
            ("ratings", 9080),
            ("reviews", 9080),
        ],
        &[
            workload("productpage-v1", "productpage", "v1", "productpage"),
            workload("details-v1", "details", "v1", "details"),
            workload("ratings-v1", "ratings", "v1", "ratings"),
            workload("reviews-v1", "reviews", "v1", "reviews"),
            workload("reviews-v2", "reviews", "v2", "reviews"),
            workload("reviews-v3", "reviews", "v3", "reviews"),
        ],
        ("/", "productpage", 9080),
    )
    .await;
    let page = m.requests("/productpage", &[], 1, 1).await.remove(0);
    assert_eq!(page.status, 200, "{page:?}");
    assert!(
        page.body.contains("<h1>The Comedy of Errors</h1>"),
        "{}",
        page.body
    );
    assert!(
        page.body.contains("PublisherA"),
        "details through the mesh: {}",
        page.body
    );
    assert!(
        page.body.contains("Reviews served by: <b>reviews-v"),
        "{}",
        page.body
    );

    m.write("subsets.yaml", SUBSETS);
    m.write("jason.yaml", JASON);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let jason = m
            .requests("/productpage", &[("cookie", "user=jason")], 1, 1)
            .await;
        if jason[0]
            .body
            .contains("Reviews served by: <b>reviews-v2</b>")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "jason never reached v2: {:?}",
            jason[0].body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let jason = m
        .requests("/productpage", &[("cookie", "user=jason")], 20, 4)
        .await;
    assert!(
        jason
            .iter()
            .all(|o| o.body.contains("reviews-v2</b>") && o.body.contains("★"))
    );
    let others = m.requests("/productpage", &[], 20, 4).await;
    assert!(
        others.iter().all(|o| o.body.contains("reviews-v1</b>")),
        "{:?}",
        others[0].body
    );
}
